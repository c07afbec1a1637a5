"""Run folders: find the stores and label sets a command needs, train, evaluate, and keep a log.

Usage::

    outcome = train_and_evaluate(TrainConfig(labels="eps"), ws.label_source("eps"), ws, gt=ws.labels["gt"])
    evaluate_existing(Path("runs/eps-bn-linear"), ws.labels["gt"], ws, flip_tta=True)
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cache.labels import ensure_labels
from pipeline.cache.store import FeatureStore
from pipeline.config import LabelSource, TrainConfig, Workspace
from pipeline.errors import ConfigError, LabelError
from pipeline.training.evaluate import EvalResult, evaluate_run
from pipeline.training.train import TrainResult, train_head

log = logging.getLogger(__name__)

#: Called with (stage, done, total, loss or None).
StageProgress = Callable[[str, int, int, float | None], None]


@dataclass
class RunOutcome:
    run_dir: Path
    labels: str
    train: TrainResult
    evaluation: EvalResult | None


def next_run_dir(runs: Path, stem: str) -> Path:
    """``runs/<stem>``, or ``runs/<stem>-2``, ``-3`` ... when taken."""
    path, n = runs / stem, 1
    while path.exists():
        n += 1
        path = runs / f"{stem}-{n}"
    return path


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Copy the library's INFO messages into ``run_dir/train.log`` while the block runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("pipeline")
    previous = root.level
    root.addHandler(handler)
    root.setLevel(min(previous or logging.WARNING, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def _train_store(ws: Workspace | None, store: Path | None, features: str | None) -> Path:
    if store is not None:
        return store
    if ws is None:
        raise ConfigError("no training store: pass --store PATH.zarr or run where an ssvt.toml is")
    return ws.find_store(ws.train_split, features)


def train_and_evaluate(
    cfg: TrainConfig,
    source: LabelSource,
    ws: Workspace | None,
    *,
    store: Path | None = None,
    val_store: Path | None = None,
    gt: LabelSource | None = None,
    features: str | None = None,
    out: Path | None = None,
    strict: bool = False,
    progress: StageProgress | None = None,
) -> RunOutcome:
    """Import the label set if needed, train the head, and evaluate it when a validation store and
    ground truth exist. Returns what was done; the run folder holds the rest."""
    progress = progress or (lambda *_: None)
    train_path = _train_store(ws, store, features)
    fs = FeatureStore.open(train_path)
    num_classes = ws.num_classes if ws else 21
    if source.kind == "cls-labels":
        raise LabelError(
            f"{source.name!r} holds image-level labels; train on pseudo-masks made from them "
            "(SEAM/EPS/IRN output, kind = mask) instead"
        )
    labels = ensure_labels(source, fs, num_classes=num_classes, strict=strict,
                           progress=lambda d, t: progress(f"import {source.name}", d, t, None))  # fmt: skip
    run_dir = out or next_run_dir(ws.runs_dir if ws else Path("runs"), f"{source.name}-{cfg.head}")
    with run_log(run_dir):
        log.info("training %s head on %s with labels %r (%s, %.2f%% of pixels labelled)", cfg.head, train_path,
                 source.name, labels.kind, 100 * labels.attrs["labelled_fraction"])  # fmt: skip
        result = train_head(fs, labels, cfg, run_dir, num_classes=num_classes,
                            progress=lambda s, t, loss: progress("train", s, t, loss))  # fmt: skip
        log.info("trained %d steps over %d images in %.1f s", result.steps, result.images, result.seconds)
        evaluation = None
        val_path = val_store or (train_path.parent / f"{ws.val_split}.zarr" if ws and ws.val_split else None)
        if val_path is not None and val_path.exists() and gt is not None:
            evaluation = evaluate_run(run_dir, FeatureStore.open(val_path), gt, device=cfg.device,
                                      progress=lambda d, t: progress("evaluate", d, t, None))  # fmt: skip
            log.info("validation mIoU %.4f on %d images (%s)", evaluation.miou, evaluation.images, val_path)
        else:
            log.info("no validation store or ground truth; not evaluated")
    return RunOutcome(run_dir, source.name, result, evaluation)


def evaluate_existing(
    run_dir: Path,
    gt: LabelSource,
    ws: Workspace | None,
    *,
    store: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> EvalResult:
    """Evaluate a run folder on ``store``, by default the validation split next to its training store."""
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} is not a train-head run folder (no config.json)")
    if store is None:
        trained_on = Path(json.loads((run_dir / "config.json").read_text())["store"]["path"])
        split = ws.val_split if ws and ws.val_split else "val"
        store = trained_on.parent / f"{split}.zarr"
    return evaluate_run(run_dir, FeatureStore.open(store), gt, progress=progress, **kwargs)
