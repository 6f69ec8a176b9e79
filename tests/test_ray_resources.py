"""The shared Ray options: --resources YAML files, memory sizes, and command-line precedence."""

from __future__ import annotations

import argparse

import pytest

from pipeline.commands.ray_args import (
    ResourcesFileError,
    add_ray_arguments,
    load_resources_file,
    parse_memory_size,
    ray_options_from_args,
)


def _options(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_ray_arguments(parser)
    return ray_options_from_args(parser.parse_args(argv))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("17179869184", 17179869184),
        ("16GiB", 16 * 1024**3),
        ("16 gib", 16 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("16G", 16 * 1000**3),
        ("1.5GB", 1_500_000_000),
        (2048, 2048),
    ],
)
def test_memory_sizes_parse(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "16 parsecs", "-1GiB", "0", "GiB", True])
def test_bad_memory_sizes_rejected(text):
    with pytest.raises(ResourcesFileError, match="invalid memory size"):
        parse_memory_size(text)


def test_file_values_used(tmp_path):
    path = tmp_path / "resources.yaml"
    path.write_text("workers: 16\ncpus_per_worker: 4\ngpus_per_worker: 1\nmemory_per_worker: 24GiB\n", encoding="utf-8")

    options = _options(["--resources", str(path)])

    assert options.workers == 16
    assert options.cpus_per_worker == 4.0
    assert options.gpus_per_worker == 1.0
    assert options.memory_per_worker == 24 * 1024**3


def test_command_line_wins(tmp_path):
    path = tmp_path / "resources.yaml"
    path.write_text("workers: 16\ncpus_per_worker: 4\nmemory_per_worker: 24GiB\n", encoding="utf-8")

    options = _options(["--resources", str(path), "--workers", "3", "--memory-per-worker", "2GiB"])

    assert options.workers == 3
    assert options.cpus_per_worker == 4.0
    assert options.memory_per_worker == 2 * 1024**3
    assert options.gpus_per_worker == 0.0


def test_defaults_without_file():
    options = _options(["--address", "auto"])

    assert options.address == "auto"
    assert options.workers == 0
    assert options.cpus_per_worker == 0.0
    assert options.memory_per_worker is None
    assert options.max_retries == 2
    assert options.start_timeout_s == 1800.0


def test_zero_start_timeout_waits_forever():
    assert _options(["--start-timeout", "0"]).start_timeout_s is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workers: 4\nnodes: 2\n", "unknown keys nodes"),
        ("workers: 0\n", "workers must be a whole number of at least 1"),
        ("workers: 2.5\n", "workers must be a whole number"),
        ("cpus_per_worker: -1\n", "cpus_per_worker must be more than 0"),
        ("gpus_per_worker: many\n", "gpus_per_worker must be a number"),
        ("memory_per_worker: lots\n", "invalid memory size 'lots'"),
        ("- workers\n", "must be a mapping"),
        ("workers: [1\n", "is not valid YAML"),
    ],
)
def test_bad_files_rejected(tmp_path, text, message):
    path = tmp_path / "resources.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ResourcesFileError, match=message) as raised:
        load_resources_file(path)
    assert str(path) in str(raised.value)


def test_missing_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resources file not found"):
        load_resources_file(tmp_path / "absent.yaml")


def test_empty_file_gives_nothing(tmp_path):
    path = tmp_path / "resources.yaml"
    path.write_text("# no values yet\n", encoding="utf-8")

    assert load_resources_file(path) == {}


def test_bad_command_line_value_rejected():
    with pytest.raises(ResourcesFileError, match="cpus_per_worker must be more than 0"):
        _options(["--cpus-per-worker", "0"])
