"""Caption shards: parsed captions as flat arrays plus offsets, one HDF5 file per chunk.

Shapes: N captions in the shard, T tokens, O objects, M object modifiers, E relations,
P predicate tokens over all captions of the shard. Caption ``i`` owns tokens
``token_offsets[i]:token_offsets[i + 1]`` and likewise objects and relations; token, head,
object and predicate-token indices are local to their caption. The schema is documented
in ``docs/shards.md``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import __version__
from pipeline.atomic import temporary_path
from pipeline.h5io import STRING_DTYPE, check_offsets, read_strings, set_json_attr, write_strings

logger = logging.getLogger(__name__)

SCHEMA = "cmsei.captions"
SCHEMA_VERSION = 1
MODIFIER_KINDS = ("amod", "compound", "nummod")



def shard_file_name(shard_index: int) -> str:
    """Return the file name of caption shard ``shard_index``."""
    return f"captions-{shard_index:05d}.h5"


class _Columns:
    """Python lists that collect one shard's flat columns before they are written."""

    def __init__(self) -> None:
        self.per_caption: dict[str, list] = {name: [] for name in ("image_ids", "caption_index", "splits", "texts")}
        self.tokens: dict[str, list] = {name: [] for name in ("token_text", "token_lower", "token_lemma", "token_pos", "token_dep", "token_head")}
        self.objects: dict[str, list] = {name: [] for name in ("object_head", "object_start", "object_end", "object_head_lemma")}
        self.modifiers: dict[str, list] = {"modifier_token": [], "modifier_kind": []}
        self.relations: dict[str, list] = {"relation_subject": [], "relation_object": [], "relation_predicate": []}
        self.predicate_tokens: list[int] = []
        self.offsets: dict[str, list[int]] = {
            name: [0] for name in ("token_offsets", "object_offsets", "relation_offsets", "modifier_offsets", "predicate_token_offsets")
        }
        self.pos_names: dict[str, int] = {}
        self.dep_names: dict[str, int] = {}


def _label_id(names: dict[str, int], label: str) -> int:
    if label not in names:
        names[label] = len(names)
    return names[label]


class CaptionShardWriter:
    """Collect parsed captions, then write and publish one caption shard atomically."""

    def __init__(self, path: Path, shard_index: int, attrs: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.shard_index = shard_index
        self._attrs = dict(attrs or {})
        self._columns = _Columns()

    def add(self, image_id: str, caption_index: int, split: str | None, parse: Any) -> None:
        """Append one caption and its parse (an ``extractors.captions.ParsedCaption``)."""
        columns = self._columns
        for name, value in zip(columns.per_caption, (image_id, caption_index, split or "", parse.text)):
            columns.per_caption[name].append(value)
        self._add_tokens(parse.tokens)
        self._add_objects(parse.objects)
        self._add_relations(parse.relations)

    def _add_tokens(self, tokens: list[Any]) -> None:
        columns = self._columns
        tokens_out = columns.tokens
        for token in tokens:
            tokens_out["token_text"].append(token.text)
            tokens_out["token_lower"].append(token.lower)
            tokens_out["token_lemma"].append(token.lemma)
            tokens_out["token_pos"].append(_label_id(columns.pos_names, token.pos))
            tokens_out["token_dep"].append(_label_id(columns.dep_names, token.dep))
            tokens_out["token_head"].append(token.head)
        columns.offsets["token_offsets"].append(columns.offsets["token_offsets"][-1] + len(tokens))

    def _add_objects(self, objects: list[Any]) -> None:
        columns = self._columns
        for obj in objects:
            columns.objects["object_head"].append(obj.head)
            columns.objects["object_start"].append(obj.start)
            columns.objects["object_end"].append(obj.end)
            columns.objects["object_head_lemma"].append(obj.head_lemma)
            for token_index, kind in obj.modifiers:
                columns.modifiers["modifier_token"].append(token_index)
                columns.modifiers["modifier_kind"].append(MODIFIER_KINDS.index(kind))
            columns.offsets["modifier_offsets"].append(columns.offsets["modifier_offsets"][-1] + len(obj.modifiers))
        columns.offsets["object_offsets"].append(columns.offsets["object_offsets"][-1] + len(objects))

    def _add_relations(self, relations: list[Any]) -> None:
        columns = self._columns
        for relation in relations:
            columns.relations["relation_subject"].append(relation.subject)
            columns.relations["relation_object"].append(relation.object)
            columns.relations["relation_predicate"].append(relation.predicate)
            columns.predicate_tokens.extend(relation.predicate_tokens)
            offsets = columns.offsets["predicate_token_offsets"]
            offsets.append(offsets[-1] + len(relation.predicate_tokens))
        columns.offsets["relation_offsets"].append(columns.offsets["relation_offsets"][-1] + len(relations))

    def close(self) -> dict[str, int]:
        """Write, verify and publish the shard; return its counts."""
        tmp = temporary_path(self.path)
        try:
            counts = self._write(tmp)
            problems = verify_caption_shard(tmp)
            if problems:
                raise RuntimeError(f"{self.path.name} failed verification after writing: {'; '.join(problems)}")
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return counts

    def _write(self, tmp: Path) -> dict[str, int]:
        columns = self._columns
        with h5py.File(tmp, "w") as h5:
            for group in (columns.per_caption, columns.tokens, columns.objects, columns.modifiers, columns.relations):
                for name, values in group.items():
                    _write_column(h5, name, values)
            _write_column(h5, "predicate_tokens", columns.predicate_tokens, np.int32)
            for name, values in columns.offsets.items():
                h5.create_dataset(name, data=np.asarray(values, dtype=np.int64))
            write_strings(h5, "pos_names", list(columns.pos_names))
            write_strings(h5, "dep_names", list(columns.dep_names))
            write_strings(h5, "modifier_kind_names", list(MODIFIER_KINDS))

            counts = {
                "num_captions": len(columns.per_caption["texts"]),
                "num_tokens": len(columns.tokens["token_text"]),
                "num_objects": len(columns.objects["object_head"]),
                "num_relations": len(columns.relations["relation_subject"]),
            }
            h5.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "toolkit_version": __version__,
                             "shard_index": self.shard_index, **counts})
            for key, value in self._attrs.items():
                set_json_attr(h5, key, value)
            h5.attrs["complete"] = True
        return counts


INT_COLUMNS = {"caption_index", "token_pos", "token_dep", "token_head", "object_head", "object_start", "object_end",
               "modifier_token", "modifier_kind", "relation_subject", "relation_object"}


def _write_column(h5: h5py.File, name: str, values: list, dtype: Any = None) -> None:
    if dtype is None:
        dtype = np.int32 if name in INT_COLUMNS else STRING_DTYPE
    if dtype is STRING_DTYPE:
        data = np.array(values, dtype=object) if values else np.zeros((0,), dtype=object)
        h5.create_dataset(name, data=data, dtype=STRING_DTYPE, compression="gzip", compression_opts=1)
    else:
        h5.create_dataset(name, data=np.asarray(values, dtype=dtype).reshape(-1), compression="gzip", compression_opts=1)


# column -> offsets array that partitions it
PARTITIONS = {
    "token_offsets": ("num_captions", ["token_text", "token_lower", "token_lemma", "token_pos", "token_dep", "token_head"]),
    "object_offsets": ("num_captions", ["object_head", "object_start", "object_end", "object_head_lemma"]),
    "relation_offsets": ("num_captions", ["relation_subject", "relation_object", "relation_predicate"]),
    "modifier_offsets": ("num_objects", ["modifier_token", "modifier_kind"]),
    "predicate_token_offsets": ("num_relations", ["predicate_tokens"]),
}


def verify_caption_shard(path: str | os.PathLike, expected_count: int | None = None) -> list[str]:
    """Check a caption shard; return a list of problems (empty when sound)."""
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        return [f"cannot open as HDF5: {error}"]
    try:
        return _verify_open(h5, expected_count)
    except (OSError, KeyError, ValueError) as error:
        return [f"unreadable data: {error}"]
    finally:
        h5.close()


def _verify_open(h5: h5py.File, expected_count: int | None) -> list[str]:
    if h5.attrs.get("schema") != SCHEMA:
        return [f"schema attribute is {h5.attrs.get('schema')!r}, expected {SCHEMA!r}"]
    if not h5.attrs.get("complete", False):
        return ["shard is not marked complete"]

    problems = []
    num_captions = int(h5.attrs["num_captions"])
    if expected_count is not None and num_captions != expected_count:
        problems.append(f"holds {num_captions} captions, the manifest plans {expected_count}")
    for name in ("image_ids", "caption_index", "splits", "texts"):
        if h5[name].shape[0] != num_captions:
            problems.append(f"{name} has {h5[name].shape[0]} rows, expected {num_captions}")

    for offsets_name, (count_attr, columns) in PARTITIONS.items():
        offsets = h5[offsets_name][()]
        rows = h5[columns[0]].shape[0]
        problem = check_offsets(offsets, int(h5.attrs[count_attr]), rows)
        if problem:
            problems.append(f"{offsets_name}: {problem}")
        for column in columns:
            if h5[column].shape[0] != rows:
                problems.append(f"{column} has {h5[column].shape[0]} rows, expected {rows}")
            h5[column][()]
    return problems


class CaptionShard:
    """Read access to one caption shard.

    Example:
        >>> with CaptionShard("DATA/captions/captions-00000.h5") as shard:
        ...     print(shard.texts[0], shard.tokens(0)["lower"])
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._h5 = h5py.File(self.path, "r")
        if self._h5.attrs.get("schema") != SCHEMA:
            self._h5.close()
            raise ValueError(f"{self.path} is not a caption shard")
        h5 = self._h5
        self.image_ids = read_strings(h5["image_ids"])
        self.caption_index = h5["caption_index"][()]
        self.splits = read_strings(h5["splits"])
        self.texts = read_strings(h5["texts"])
        self.offsets = {name: h5[name][()] for name in PARTITIONS}
        self.pos_names = read_strings(h5["pos_names"])
        self.dep_names = read_strings(h5["dep_names"])
        self._cache: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def column(self, name: str) -> Any:
        """Return a whole flat column, read once and cached (strings decoded)."""
        if name not in self._cache:
            dataset = self._h5[name]
            self._cache[name] = read_strings(dataset) if dataset.dtype.kind == "O" else dataset[()]
        return self._cache[name]

    def _span(self, offsets_name: str, row: int) -> slice:
        offsets = self.offsets[offsets_name]
        return slice(int(offsets[row]), int(offsets[row + 1]))

    def tokens(self, row: int) -> dict[str, list]:
        """Return caption ``row``'s tokens: text, lower, lemma, pos, dep (names) and head indices."""
        span = self._span("token_offsets", row)
        pos = self.column("token_pos")[span]
        dep = self.column("token_dep")[span]
        return {
            "text": self.column("token_text")[span],
            "lower": self.column("token_lower")[span],
            "lemma": self.column("token_lemma")[span],
            "pos": [self.pos_names[i] for i in pos],
            "dep": [self.dep_names[i] for i in dep],
            "head": self.column("token_head")[span].tolist(),
        }

    def objects(self, row: int) -> list[dict[str, Any]]:
        """Return caption ``row``'s objects: head, span, head lemma and modifiers."""
        span = self._span("object_offsets", row)
        modifier_offsets = self.offsets["modifier_offsets"]
        kinds = self.column("modifier_kind")
        tokens = self.column("modifier_token")
        result = []
        for index in range(span.start, span.stop):
            first, last = int(modifier_offsets[index]), int(modifier_offsets[index + 1])
            result.append({
                "head": int(self.column("object_head")[index]),
                "start": int(self.column("object_start")[index]),
                "end": int(self.column("object_end")[index]),
                "head_lemma": self.column("object_head_lemma")[index],
                "modifiers": [(int(tokens[m]), MODIFIER_KINDS[int(kinds[m])]) for m in range(first, last)],
            })
        return result

    def relations(self, row: int) -> list[dict[str, Any]]:
        """Return caption ``row``'s relations as subject/object indices into its objects and a predicate."""
        span = self._span("relation_offsets", row)
        predicate_offsets = self.offsets["predicate_token_offsets"]
        predicate_tokens = self.column("predicate_tokens")
        return [
            {
                "subject": int(self.column("relation_subject")[index]),
                "predicate": self.column("relation_predicate")[index],
                "object": int(self.column("relation_object")[index]),
                "predicate_tokens": predicate_tokens[int(predicate_offsets[index]):int(predicate_offsets[index + 1])].tolist(),
            }
            for index in range(span.start, span.stop)
        ]

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> "CaptionShard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
