"""``train-head`` as one call: find the stores and label set it needs, train, evaluate, keep a log.

Usage::

    outcome = train_and_evaluate(TrainConfig(labels="eps"), ws.label_source("eps"), ws, gt=ws.labels["gt"])
    outcome.run_dir, outcome.evaluation.miou      # runs/eps-bn-linear, the val split's mIoU
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.labels import LabelSet, ensure_labels
from pipeline.cache.names import CacheLayout, RunFiles, StrPath, label_set_path, run_stem, sibling_store
from pipeline.cache.store import FeatureStore
from pipeline.config import TrainConfig, Workspace, label_source
from pipeline.errors import ConfigError, LabelError
from pipeline.training.evaluate import EvalResult, evaluate
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


@contextlib.contextmanager
def run_log(run_dir: StrPath) -> Iterator[None]:
    """Copy the library's INFO messages into ``run_dir/train.log`` while the block runs."""
    files = RunFiles(run_dir)
    files.dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(files.log)
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


def training_store_path(ws: Workspace | None, store_path: StrPath | None = None, features: str | None = None) -> Path:
    """``store_path`` when given, else the workspace's training split in its cache (``features``: the folder)."""
    if store_path is not None:
        return Path(store_path)
    if ws is None:
        raise ConfigError("no training store: pass --store PATH.zarr or run where an ssvt.toml is")
    return ws.layout.find_store(ws.train_split, features)


def resolve_labels(
    name: str, ws: Workspace | None, *, kind: str | None = None, store_path: StrPath | None = None, features: str | None = None
) -> LabelSource | str:
    """What ``--labels NAME`` means: a label source of the workspace or a path (:func:`label_source`), else
    the name of a label set ssvt made itself (``ssvt pseudo-masks``) beside the training store."""
    try:
        return label_source(name, ws, kind)
    except ConfigError:
        try:
            made = label_set_path(training_store_path(ws, store_path, features), name).exists()
        except ConfigError:
            made = False
        if not made:
            raise
        return name


def _made_label_set(store: FeatureStore, name: str) -> LabelSet:
    """A label set ssvt wrote itself (no source files): used as it is, if it was made from this store."""
    labels = LabelSet.open(label_set_path(store.path, name))
    if labels.attrs.get("store_fingerprint") != store.fingerprint():
        raise LabelError(f"label set {name!r} was made from another feature store than {store.path}; make it again")
    return labels


def train_and_evaluate(
    cfg: TrainConfig,
    source: LabelSource | str,
    ws: Workspace | None,
    *,
    store_path: StrPath | None = None,
    val_store_path: StrPath | None = None,
    gt: LabelSource | None = None,
    features: str | None = None,
    out: Path | None = None,
    strict: bool = False,
    progress: StageProgress | None = None,
) -> RunOutcome:
    """Import the label set if needed, train the head, and evaluate it when a validation store and
    ground truth exist. Returns what was done; the run folder holds the rest.

    ``source`` is a label source, or the name of a label set ssvt made beside the training store
    (:func:`resolve_labels`). Settings are checked before anything is read or written: ``cfg`` (head
    name included) when it is built, the label source's kind here, so a bad name never leaves a run
    folder behind."""
    progress = progress or (lambda *_: None)
    if isinstance(source, LabelSource) and not source.spec.trainable:
        raise LabelError(
            f"{source.name!r} holds image-level labels (kind {source.kind}); train on pseudo-masks made from them "
            "(SEAM/EPS/IRN output, kind = mask) instead"
        )
    train_path = training_store_path(ws, store_path, features)
    store = FeatureStore.open(train_path)
    num_classes = ws.num_classes if ws else 21
    if isinstance(source, str):
        labels = _made_label_set(store, source)
    else:
        labels = ensure_labels(source, store, num_classes=num_classes, strict=strict,
                               progress=lambda d, t: progress(f"import {source.name}", d, t, None))  # fmt: skip
    layout = ws.layout if ws else CacheLayout("cache")
    run_dir = out or layout.new_run_dir(run_stem(labels.name, cfg.head))
    with run_log(run_dir):
        log.info("training %s head on %s with labels %r (%s, %.2f%% of pixels labelled)", cfg.head, train_path,
                 labels.name, labels.kind, 100 * labels.attrs["labelled_fraction"])  # fmt: skip
        result = train_head(store, labels, cfg, run_dir, num_classes=num_classes,
                            progress=lambda s, t, loss: progress("train", s, t, loss))  # fmt: skip
        log.info("trained %d steps over %d images in %.1f s", result.steps, result.images, result.seconds)
        evaluation = None
        val_path = val_store_path or (sibling_store(train_path, ws.val_split) if ws and ws.val_split else None)
        if val_path is not None and Path(val_path).exists() and gt is not None:
            evaluation = evaluate(run_dir, gt, store_path=val_path, device=cfg.device,
                                  progress=lambda d, t: progress("evaluate", d, t, None))  # fmt: skip
            log.info("validation mIoU %.4f on %d images (%s)", evaluation.miou, evaluation.images, val_path)
        else:
            log.info("no validation store or ground truth; not evaluated")
    return RunOutcome(run_dir, labels.name, result, evaluation)
