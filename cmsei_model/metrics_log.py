"""Per-epoch training metrics: `metrics.csv`, `metrics.json` and the plot `curves.png`.

Each row is one epoch as a flat dict of numbers and strings, for example epoch, step,
train_loss, lr, samples_per_s and the validation recalls val_i2t_r1 ... val_rsum. All three
files are rewritten atomically after every epoch, so they always describe whole epochs.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.atomic import atomic_path, write_json

logger = logging.getLogger(__name__)

CSV_NAME = "metrics.csv"
JSON_NAME = "metrics.json"
PLOT_NAME = "curves.png"
RECALL_COLUMNS = ("val_i2t_r1", "val_i2t_r5", "val_i2t_r10", "val_t2i_r1", "val_t2i_r5", "val_t2i_r10")


class MetricsLog:
    """The metrics of a run folder, one row per epoch.

    Args:
        run_dir: the run folder; the files are written there.
        rows: rows of earlier epochs, for example from `MetricsLog.load` on resume.
    """

    def __init__(self, run_dir: str | os.PathLike, rows: list[dict[str, Any]] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = list(rows or [])

    @classmethod
    def load(cls, run_dir: str | os.PathLike, up_to_epoch: int | None = None) -> MetricsLog:
        """Read `metrics.json` of a run folder, keeping epochs <= `up_to_epoch`.

        A missing file gives an empty log. Rows of later epochs come from an interrupted run
        whose checkpoint was not written, so `--resume` drops them.

        Raises:
            ValueError: when the file is not valid JSON of the expected layout.
        """
        path = Path(run_dir) / JSON_NAME
        if not path.is_file():
            return cls(run_dir)
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["epochs"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a metrics file written by cmsei-train: {error}") from error
        if up_to_epoch is not None:
            rows = [row for row in rows if int(row["epoch"]) <= up_to_epoch]
        return cls(run_dir, rows)

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch's row and rewrite the CSV, JSON and PNG files."""
        self.rows.append(dict(row))
        self.write()

    def write(self) -> None:
        """Rewrite the CSV, JSON and PNG files from the rows."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / JSON_NAME, {"epochs": self.rows})
        self._write_csv()
        plot_curves(self.rows, self.run_dir / PLOT_NAME)

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns.extend(name for name in row if name not in columns)
        with atomic_path(self.run_dir / CSV_NAME) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)


def plot_curves(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Plot the training loss and the validation recalls and rSum per epoch to a PNG file.

    Uses matplotlib's Agg canvas directly, so no display and no global backend are needed.
    """
    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, recall_axes, rsum_axes = figure.subplots(1, 3)
    epochs = [int(row["epoch"]) for row in rows]

    _plot_column(loss_axes, rows, epochs, "train_loss", "training loss per pair")
    loss_axes.set_title("loss")
    for name in RECALL_COLUMNS:
        _plot_column(recall_axes, rows, epochs, name, name.removeprefix("val_"))
    recall_axes.set_title("validation recall (%)")
    _plot_column(rsum_axes, rows, epochs, "val_rsum", "rSum")
    rsum_axes.set_title("validation rSum")
    for axes in (loss_axes, recall_axes, rsum_axes):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, alpha=0.3)
        if axes.has_data():
            axes.legend(fontsize=7)
    figure.tight_layout()

    target = Path(path)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            figure.savefig(handle, format="png")


def _plot_column(axes: Any, rows: list[dict[str, Any]], epochs: list[int], name: str, label: str) -> None:
    points = [
        (epoch, float(row[name]))
        for epoch, row in zip(epochs, rows)
        if row.get(name) is not None and math.isfinite(float(row[name]))
    ]
    if points:
        xs, ys = zip(*points)
        axes.plot(xs, ys, marker="o", markersize=3, label=label)
