"""``train-head`` as one call: find the stores and label set it needs, train, evaluate, keep a log.

Usage::

    outcome = train_and_evaluate(TrainConfig(labels="eps"), ws.label_source("eps"), ws, gt=ws.labels["gt"])
    outcome.run_dir, outcome.evaluation.miou      # runs/eps-bn-linear, the val split's mIoU
    train_many_and_evaluate([(cfg_a, "eps", dir_a), (cfg_b, "gt", dir_b)], ws, store_path=train)  # one pass, two heads
    train_and_evaluate(cfg, source, ws, ranks=Ranks.from_environment())   # under torchrun: one head, data-parallel
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.labels import LabelSet, ensure_labels
from pipeline.cache.names import (
    CacheLayout,
    Location,
    RunFiles,
    StorePath,
    StrPath,
    label_set_path,
    location,
    run_stem,
    sibling_store,
)
from pipeline.cache.store import FeatureStore
from pipeline.config import TrainConfig
from pipeline.distributed import Ranks
from pipeline.errors import ConfigError, LabelError, SsvtError
from pipeline.training.data_parallel import check_batch_split
from pipeline.training.evaluate import EvalResult, evaluate
from pipeline.training.steplog import summary_writer_class, tensorboard_scalars
from pipeline.training.train import HeadJob, TrainResult, fuse_key, train_head, train_heads
from pipeline.workspace import Workspace, label_source

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


def training_store_path(ws: Workspace | None, store_path: StorePath | None = None, features: str | None = None) -> Location:
    """``store_path`` when given, else the workspace's training split in its cache (``features``: the folder)."""
    if store_path is not None:
        return location(store_path)
    if ws is None:
        raise ConfigError("no training store: pass --store PATH.zarr or run where an ssvt.toml is")
    return ws.layout.find_store(ws.train_split, features)


def resolve_labels(
    name: str, ws: Workspace | None, *, kind: str | None = None, store_path: StorePath | None = None, features: str | None = None
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


def open_label_set(store: FeatureStore, name: str) -> LabelSet:
    """A label set beside ``store`` (imported, or made by ssvt), used as it is if it was made from this store."""
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
    ranks: Ranks | None = None,
) -> RunOutcome:
    """Import the label set if needed, train the head, and evaluate it when a validation store and
    ground truth exist. Returns what was done; the run folder holds the rest. With ``cfg.tensorboard``
    the final mIoU and pixel accuracy join the run's TensorBoard scalars (``val/miou``, ``val/pixel_accuracy``).

    ``source`` is a label source, or the name of a label set ssvt made beside the training store
    (:func:`resolve_labels`). Settings are checked before anything is read or written: ``cfg`` (head
    name included) when it is built, the label source's kind here, so a bad name never leaves a run
    folder behind.

    With ``ranks`` of several processes (torchrun) the head trains data-parallel
    (:func:`~pipeline.training.train.train_heads`): rank 0 imports the label set and names the run
    folder before the others open them, and alone writes the run folder and evaluates; the other
    ranks return their outcome without an evaluation."""
    progress = progress or (lambda *_: None)
    ranks = ranks or Ranks.single()
    if ranks.world > 1:
        check_batch_split(cfg.batch_size, ranks.world)
    if cfg.tensorboard:
        summary_writer_class()  # ConfigError when the tensorboard package is missing
    if isinstance(source, LabelSource) and not source.spec.trainable:
        raise LabelError(
            f"{source.name!r} holds image-level labels (kind {source.kind}); train on pseudo-masks made from them "
            "(SEAM/EPS/IRN output, kind = mask) instead"
        )
    train_path = training_store_path(ws, store_path, features)
    store = FeatureStore.open(train_path)
    num_classes = ws.num_classes if ws else 21
    labels, run_dir = _labels_and_run_dir(source, store, cfg, ws, out, strict, num_classes, progress, ranks)
    with run_log(run_dir) if ranks.is_main else contextlib.nullcontext():
        log.info("training %s head on %s with labels %r (%s, %.2f%% of pixels labelled)", cfg.head, train_path,
                 labels.name, labels.kind, 100 * labels.attrs["labelled_fraction"])  # fmt: skip
        result = train_head(store, labels, cfg, run_dir, num_classes=num_classes, class_names=ws.classes if ws else None,
                            progress=lambda s, t, loss: progress("train", s, t, loss), ranks=ranks)  # fmt: skip
        evaluation = _finish(run_dir, cfg, result, train_path, ws, gt, val_store_path, progress) if ranks.is_main else None
    return RunOutcome(run_dir, labels.name, result, evaluation)


def _labels_and_run_dir(
    source: LabelSource | str, store: FeatureStore, cfg: TrainConfig, ws: Workspace | None, out: Path | None, strict: bool,
    num_classes: int, progress: StageProgress, ranks: Ranks,
) -> tuple[LabelSet, Path]:  # fmt: skip
    """The label set (imported if need be) and the run folder's path, both made by rank 0 alone (the
    label store is written by one process) before the other ranks open them; a failure stops every rank."""

    def make() -> tuple[str, Path]:
        if isinstance(source, str):
            labels = open_label_set(store, source)
        else:
            labels = ensure_labels(source, store, num_classes=num_classes, strict=strict,
                                   progress=lambda d, t: progress(f"import {source.name}", d, t, None))  # fmt: skip
        layout = ws.layout if ws else CacheLayout("cache")
        return labels.name, out or layout.new_run_dir(run_stem(labels.name, cfg.head))

    name, run_dir = ranks.on_main(make, "importing the labels")
    return open_label_set(store, name), run_dir


def _finish(
    run_dir: Path, cfg: TrainConfig, result: TrainResult, train_path: Location, ws: Workspace | None,
    gt: LabelSource | None, val_store_path: StorePath | None, progress: StageProgress,
) -> EvalResult | None:  # fmt: skip
    """Log the training, evaluate on the validation store when there is one and ground truth."""
    log.info("trained %d steps over %d images in %.1f s", result.steps, result.images, result.seconds)
    val_path = val_store_path or (sibling_store(train_path, ws.val_split) if ws and ws.val_split else None)
    if val_path is None or not location(val_path).exists() or gt is None:
        log.info("no validation store or ground truth; not evaluated")
        return None
    evaluation = evaluate(run_dir, gt, store_path=val_path, device=cfg.device,
                          progress=lambda d, t: progress("evaluate", d, t, None))  # fmt: skip
    log.info("validation mIoU %.4f on %d images (%s)", evaluation.miou, evaluation.images, val_path)
    if cfg.tensorboard:
        tensorboard_scalars(run_dir, result.steps, {"val/miou": evaluation.miou,
                                                    "val/pixel_accuracy": evaluation.pixel_accuracy})  # fmt: skip
    return evaluation


def train_many_and_evaluate(
    jobs: Sequence[tuple[TrainConfig, str, Path]],
    ws: Workspace,
    *,
    store_path: StorePath,
    gt: LabelSource | None = None,
    progress: StageProgress | None = None,
) -> list[RunOutcome | SsvtError]:
    """Train (config, label set name, run folder) jobs on one store, in as few passes over the features
    as :func:`~pipeline.training.train.fuse_key` allows, and evaluate each. The label sets must be
    imported already. Returns an outcome, or the error of a job that failed, per job in order."""
    report = progress or (lambda *_: None)
    store = FeatureStore.open(store_path)
    out: dict[int, RunOutcome | SsvtError] = {}
    groups: dict[Any, list[tuple[int, HeadJob]]] = {}
    for i, (cfg, name, run_dir) in enumerate(jobs):
        try:
            job = HeadJob(open_label_set(store, name), cfg, run_dir)
            key = fuse_key(store, job)
        except SsvtError as exc:
            out[i] = exc
            continue
        groups.setdefault(key, []).append((i, job))
    for members in groups.values():
        group = [job for _, job in members]
        with contextlib.ExitStack() as logs:
            for job in group:
                shutil.rmtree(job.run_dir, ignore_errors=True)
                logs.enter_context(run_log(job.run_dir))
            log.info("training %d head(s) in one pass over %s: %s", len(group), store.path,
                     ", ".join(f"{j.labels.name}/{j.cfg.head}" for j in group))  # fmt: skip
            try:
                results = train_heads(store, group, num_classes=ws.num_classes, class_names=ws.classes,
                                      progress=lambda s, t, loss: report("train", s, t, loss))  # fmt: skip
            except SsvtError as exc:
                out.update((i, exc) for i, _ in members)
                continue
        for (i, job), result in zip(members, results, strict=True):
            with run_log(job.run_dir):
                evaluation = _finish(job.run_dir, job.cfg, result, location(store_path), ws, gt, None, report)
            out[i] = RunOutcome(job.run_dir, job.labels.name, result, evaluation)
    return [out[i] for i in range(len(jobs))]
