"""Orchestration of the cmsei data stages: CLI, Ray runner, shard formats, manifests.

A dataset folder contains one subfolder per stage (``regions/``, ``captions/``,
``graphs/``); see ``docs/shards.md`` for the layout and every HDF5 schema.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cmsei")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
