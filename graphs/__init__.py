"""Spatial relation graphs, the relation predictor, scene-graph imports and textual graphs.

``graphs.to_networkx`` builds a networkx view of any stored graph kind; see
``graphs.networkx_view``. It is imported on first use, because the networkx view needs
the dataset readers, which in turn import ``graphs.spatial``.
"""

from typing import Any

__all__ = ["to_networkx"]


def __getattr__(name: str) -> Any:
    if name == "to_networkx":
        from graphs.networkx_view import to_networkx

        return to_networkx
    raise AttributeError(f"module 'graphs' has no attribute {name!r}")
