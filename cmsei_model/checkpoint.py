"""Training checkpoints of the CMSEI retrieval trainer.

A checkpoint is a dict saved with `torch.save` under a temporary name in the target folder
and renamed, so a reader never sees half a file. It contains only tensors and plain Python
types, so `torch.load(weights_only=True)` reads it. Keys:

- format, version: "cmsei.retrieval_checkpoint" and 1;
- model: the state dict of the bare model (no DDP prefix), config: `CMSEIConfig.to_dict()`;
- vocabulary: word -> id, the same ids the model's embedding rows use;
- epoch: completed epochs, step: optimiser steps so far, best_rsum: best validation rSum;
- splits: `SplitPlan.to_dict()`, options: the training options, predicate_names;
- in `last.pt` only: optimizer, scheduler, scaler (state dicts) and rng (Python, NumPy,
  torch and CUDA generator states), so that `--resume` continues exactly.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmsei_model.config import CMSEIConfig
from cmsei_model.model import CMSEI
from extractors.captions.vocab import Vocabulary
from pipeline.atomic import atomic_path

logger = logging.getLogger(__name__)

FORMAT = "cmsei.retrieval_checkpoint"
VERSION = 1
LAST = "last.pt"
BEST = "best.pt"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or of another format."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write `payload` plus the format and version keys to `path` atomically.

    Args:
        path: target file; its folder must exist.
        payload: tensors and plain Python values only.
    """
    data = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    logger.debug("wrote checkpoint %s", path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`.

    Raises:
        CheckpointError: when the file is missing, not a torch file, or of another format
            or a newer version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; train with `cmsei-train --out {path.parent}` first")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} is not a CMSEI retrieval checkpoint (format {found!r}, expected {FORMAT!r})")
    if int(data.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {data['version']}, newer than this code reads ({VERSION}); "
            f"upgrade cmsei_model"
        )
    return data


def build_model(checkpoint: dict[str, Any]) -> tuple[CMSEI, Vocabulary]:
    """Rebuild the model and its vocabulary from a loaded checkpoint, on the CPU.

    Raises:
        CheckpointError: when the weights do not fit the stored configuration.
    """
    config = CMSEIConfig.from_dict(dict(checkpoint["config"]))
    vocabulary = Vocabulary(dict(checkpoint["vocabulary"]))
    model = CMSEI(config, len(vocabulary))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint weights do not match its configuration: {error}") from error
    return model, vocabulary


def capture_rng_state() -> dict[str, Any]:
    """Return the Python, NumPy global, torch and CUDA generator states as checkpoint values."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(numpy_state["state"]["key"], dtype=np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states that `capture_rng_state` returned."""
    random.setstate(_as_python_state(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [value.cpu() for value in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "the checkpoint contains %d CUDA generator states but %d devices are visible; CUDA generators "
                "keep their seeds", len(cuda_states), torch.cuda.device_count(),
            )


def _as_python_state(value: Any) -> tuple:
    """Turn a stored `random.getstate()` value, whose tuples may come back as lists, into a tuple."""
    version, internal, gauss = value
    return (version, tuple(internal), gauss)
