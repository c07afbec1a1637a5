"""The step log of a training run: history in memory, ``metrics.csv`` as it grows, TensorBoard scalars.

Usage::

    with StepLog(run_dir, tensorboard=True) as steps:
        steps.append({"step": 1, "epoch": 1, "loss": 2.3, "lr": 1e-9})
    steps.history["loss"]                     # [2.3]; metrics.csv and tb/ hold the same
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cache.names import RunFiles
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

#: What the history (history.json, metrics.csv) holds per step, in column order.
HISTORY_KEYS = ("step", "epoch", "loss", "lr")
#: History keys written to TensorBoard, as ``train/<key>``.
TENSORBOARD_KEYS = ("loss", "lr")


def summary_writer_class() -> type[SummaryWriter]:
    """torch's TensorBoard ``SummaryWriter``, imported on first use (stage two imports quickly without it);
    a ConfigError saying what to install when the ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard raises it when tensorboard is not installed
        raise ConfigError("--tensorboard needs the tensorboard package, not installed here: pip install tensorboard") from None
    return SummaryWriter


def tensorboard_scalars(run_dir: Path, step: int, scalars: Mapping[str, float]) -> None:
    """Add ``scalars`` (tag -> value) at ``step`` to the run's TensorBoard folder (e.g. the final mIoU)."""
    with summary_writer_class()(log_dir=str(RunFiles(run_dir).tensorboard)) as writer:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)


class StepLog:
    """The history of a run as it grows: kept in memory (``history``), appended to ``metrics.csv`` (a
    header, then one row per step, flushed, so a run that crashes keeps its rows) and, with
    ``tensorboard``, written as the scalars ``train/<key>`` of ``TENSORBOARD_KEYS`` into ``tb/``.
    A context manager; nothing is written before it is entered."""

    def __init__(self, run_dir: Path, keys: Sequence[str] = HISTORY_KEYS, *, tensorboard: bool = False) -> None:
        self.files, self.keys, self.tensorboard = RunFiles(run_dir), tuple(keys), tensorboard
        self.history: dict[str, list[float]] = {k: [] for k in self.keys}
        self._writer: SummaryWriter | None = None

    def __enter__(self) -> StepLog:
        writer_class = summary_writer_class() if self.tensorboard else None  # a missing package fails before any write
        self.files.dir.mkdir(parents=True, exist_ok=True)
        self._file = self.files.metrics_csv.open("w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(self.keys)
        self._file.flush()
        if writer_class is not None:
            for old in self.files.tensorboard.glob("events.out.tfevents.*"):  # a run written again: its old curves
                old.unlink()
            self._writer = writer_class(log_dir=str(self.files.tensorboard))
        return self

    def append(self, row: Mapping[str, float]) -> None:
        """One step: a value for every key."""
        for k in self.keys:
            self.history[k].append(row[k])
        self._csv.writerow([row[k] for k in self.keys])
        self._file.flush()
        if self._writer is not None:
            for k in TENSORBOARD_KEYS:
                self._writer.add_scalar(f"train/{k}", row[k], int(row["step"]))

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
