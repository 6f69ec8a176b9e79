"""Format detection of import sources by content, independent of file names."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.importers.detect import detect_format
from pipeline.importers.stage import ImportOptions, import_features
from tests.test_import_npz import save_butd_npz, save_mmf
from tests.test_import_scan import write_precomp
from tests.test_import_tsv import SAMPLE_TSV, butd_line, lxmert_line, random_regions


def test_detect_tsv_layouts(tmp_path):
    lxmert = tmp_path / "features.dat"
    lxmert.write_bytes(b"\n" + lxmert_line("a", 30, 40, *random_regions(1, 4, 8, 30, 40)))
    butd = tmp_path / "features.tsv.0"
    butd.write_bytes(butd_line("1", 30, 40, *random_regions(2, 4, 8, 30, 40)))
    assert detect_format(lxmert) == "lxmert-tsv"
    assert detect_format(butd) == "butd-tsv"


def test_detect_sample_tsv_renamed(sample_data, tmp_path):
    renamed = tmp_path / "features.npz"
    shutil.copy(sample_data / SAMPLE_TSV, renamed)
    assert detect_format(renamed) == "lxmert-tsv"


def test_detect_arrays_and_folders(tmp_path):
    write_precomp(tmp_path / "precomp", "test", 2, dim=8)
    save_butd_npz(tmp_path / "npz" / "a.npz", 1)
    save_mmf(tmp_path / "mmf", "a", 1)
    assert detect_format(tmp_path / "precomp") == "scan"
    assert detect_format(tmp_path / "precomp" / "test_ims.npy") == "scan"
    assert detect_format(tmp_path / "npz") == "butd-npz"
    assert detect_format(tmp_path / "npz" / "a.npz") == "butd-npz"
    assert detect_format(tmp_path / "mmf") == "mmf-npy"


def test_detect_rejects_unknown(tmp_path):
    text = tmp_path / "notes.tsv"
    text.write_text("a\tb\tc\n", encoding="utf-8")
    with pytest.raises(ValueError, match="3 tab-separated fields"):
        detect_format(text)

    matrix = tmp_path / "matrix_ims.npy"
    np.save(matrix, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        detect_format(matrix)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="--format"):
        detect_format(empty)
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "missing")


def test_forced_format_skips_detection(tmp_path):
    path = tmp_path / "six.tsv"
    path.write_bytes(butd_line("1", 30, 40, *random_regions(2, 4, 8, 30, 40)))
    summary = import_features(ImportOptions(sources=[path], out=tmp_path / "data", format="lxmert-tsv", feature_dim=8))
    assert summary.format == "lxmert-tsv"
    assert summary.num_failed == 1


def test_mixed_sources_rejected(tmp_path):
    lxmert = tmp_path / "a.tsv"
    lxmert.write_bytes(lxmert_line("a", 30, 40, *random_regions(1, 4, 8, 30, 40)))
    butd = tmp_path / "b.tsv"
    butd.write_bytes(butd_line("1", 30, 40, *random_regions(2, 4, 8, 30, 40)))
    with pytest.raises(ValueError, match="different formats"):
        import_features(ImportOptions(sources=[lxmert, butd], out=tmp_path / "data"))
