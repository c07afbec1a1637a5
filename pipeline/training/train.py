"""Stage two: train a light head on cached patch tokens with (imperfect) labels.

Usage::

    store = FeatureStore.open("cache/dinov2_vitl14-448-last/train.zarr")
    labels = ensure_labels(source, store, num_classes=21)     # the imported label set
    result = train_head(store, labels, TrainConfig(labels="eps"), Path("runs/eps-bn-linear"))

The features are loaded once into memory (GPU memory when training on a GPU) when they fit, else
streamed shard by shard with shard-aligned shuffling; the choice is made here, not by the user.
Under ``torchrun`` (``ranks`` of several processes) one head trains data-parallel, each rank holding
only its own shards (:mod:`pipeline.training.data_parallel`); only rank 0 writes the run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.cache.labels import LabelSet
from pipeline.cache.names import ImageStatus, RunFiles
from pipeline.cache.store import FeatureStore
from pipeline.config import TrainConfig
from pipeline.devices import fits_in_memory, pick_device
from pipeline.distributed import Ranks
from pipeline.errors import ConfigError, LabelError
from pipeline.heads import build_head
from pipeline.provenance import environment
from pipeline.training.batches import FeatureBatches, Step
from pipeline.training.data_parallel import (
    BatchPlan,
    StoreRows,
    check_one_gpu_each,
    global_batch_norm,
    held_features,
    planned_steps,
    sum_over_ranks,
)
from pipeline.training.losses import dense_loss, loss_share, sparse_loss, subsampled_dense_loss
from pipeline.training.steplog import HISTORY_KEYS, StepLog, summary_writer_class

log = logging.getLogger(__name__)

#: The warm-up's multiplier at step 0, rising linearly to 1 (the official config's ``warmup_ratio``).
WARMUP_RATIO = 1e-6
#: Called with (step, total steps, running loss).
TrainProgress = Callable[[int, int, float], None]


@dataclass
class TrainResult:
    """``steps`` optimiser steps made; ``epochs`` passes over the training images made, the last one
    possibly cut short; ``history`` per step: "step" (1-based), "epoch" (1-based), "loss" and "lr" (the
    rate that step used)."""

    run_dir: Path
    steps: int
    epochs: int
    images: int
    seconds: float
    in_memory: bool
    history: dict[str, list[float]] = field(default_factory=dict)


def lr_lambda(
    schedule: str, total: int, warmup: int, power: float = 1.0, warmup_ratio: float = WARMUP_RATIO
) -> Callable[[int], float]:
    """The learning-rate factor of step ``i`` (0-based: steps done), as mmcv's ``poly`` / ``CosineAnnealing``
    policies with ``warmup="linear"``, ``min_lr=0``, ``by_epoch=False``: the decay runs over all ``total``
    steps, warm-up included (poly ``(1 - i / total) ** power``, cosine ``(1 + cos(pi i / total)) / 2``),
    and during the first ``warmup`` steps it is multiplied by ``1 - (1 - i / warmup) * (1 - warmup_ratio)``,
    which rises linearly from ``warmup_ratio``. For ``torch.optim.lr_scheduler.LambdaLR``."""

    def factor(step: int) -> float:
        t = min(step / total, 1.0)  # LambdaLR asks for step == total after the last step
        regular = 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else (1 - t) ** power
        if step < warmup:
            return regular * (1 - (1 - step / warmup) * (1 - warmup_ratio))
        return regular

    return factor


def training_images(store: FeatureStore, labels: LabelSet) -> np.ndarray:
    """Store indices that were extracted and carry at least one labelled pixel."""
    usable = (store.status() == ImageStatus.OK) & labels.labelled
    left_out = int((~labels.labelled).sum())
    if left_out:
        log.info("%d of %d images have no label in %r and are left out", left_out, store.n_images, labels.name)
    indices = np.flatnonzero(usable)
    if not len(indices):
        raise LabelError(f"label set {labels.name!r} labels none of the {store.n_images} images of {store.path}")
    return indices


@dataclass(frozen=True)
class HeadJob:
    """One head to train: its labels, settings and run folder."""

    labels: LabelSet
    cfg: TrainConfig
    run_dir: Path


def train_head(
    store: FeatureStore,
    labels: LabelSet,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    progress: TrainProgress | None = None,
    plan: BatchPlan | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train ``cfg.head`` on ``store``'s tokens and ``labels`` and write the run folder (see README):
    metrics.csv as training goes (and TensorBoard events with ``cfg.tensorboard``), the rest at the end.
    ``plan`` and ``ranks``: data-parallel training and its single-process twin (:func:`train_heads`)."""
    job = HeadJob(labels, cfg, run_dir)
    return train_heads(store, [job], num_classes=num_classes, class_names=class_names, progress=progress, plan=plan,
                       ranks=ranks)[0]  # fmt: skip


#: Offset of the seed of a head's own random stream (the pixels its loss samples) from ``cfg.seed``.
LOSS_SEED_OFFSET = 2**31


def fuse_key(store: FeatureStore, job: HeadJob) -> tuple[Any, ...]:
    """Jobs with equal keys can share one pass over the features (:func:`train_heads`): the same
    training images, batches, views and number of steps."""
    cfg = job.cfg
    indices = training_images(store, job.labels)
    steps = cfg.total_steps(len(indices))
    return (str(store.path), indices.tobytes(), cfg.batch_size, cfg.seed, cfg.flip, steps, cfg.device, cfg.memory)


class _History:
    """The step log of a rank other than rank 0 in data-parallel training: the history, nothing written."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}

    def __enter__(self) -> _History:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def append(self, row: dict[str, float]) -> None:
        for k, values in self.history.items():
            values.append(row[k])


class HeadLearner:
    """One head with its optimiser, schedule, labels on the device and step log. With ``ranks`` of
    several processes the head trains data-parallel: batch norm over the global batch, wrapped in
    ``DistributedDataParallel``, the step log written by rank 0 only."""

    def __init__(
        self, job: HeadJob, masks: torch.Tensor, channels: int, n_layers: int, num_classes: int, total: int,
        ranks: Ranks | None = None,
    ):  # fmt: skip
        cfg = self.cfg = job.cfg
        self.job, self.masks = job, masks
        self.world = ranks.world if ranks is not None else 1
        torch.manual_seed(cfg.seed)  # the head's initial weights, as a separate run draws them
        head = build_head(cfg.head, channels, num_classes, n_layers=n_layers)
        self.head = (global_batch_norm(head) if self.world > 1 else head).to(masks.device)
        self.model: nn.Module = self.head
        if self.world > 1:  # every GlobalBatchNorm keeps equal statistics: no buffers to broadcast
            ids = [masks.device.index] if masks.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.head, device_ids=ids, broadcast_buffers=False)
        self.optim = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        factor = lr_lambda(cfg.schedule, total, cfg.warmup_steps(total), cfg.poly_power)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, factor)
        writes = ranks is None or ranks.is_main
        self.log: StepLog | _History = StepLog(job.run_dir, tensorboard=cfg.tensorboard) if writes else _History()
        # The loss's random pixels come from the head's own stream, so heads sharing a pass do not
        # shift each other's draws (or the shared batch order).
        self.generator = torch.Generator().manual_seed(cfg.seed + LOSS_SEED_OFFSET)
        self.running = float("nan")
        self.head.train()

    def step(
        self, x: torch.Tensor, pos: torch.Tensor, flipped: torch.Tensor, n_step: int, epoch: int, rows: slice | None = None
    ) -> None:
        """One optimiser step on tokens ``x`` (b, h, w, C) of images ``pos``, some seen mirrored (``flipped``).
        Data-parallel (``rows``): ``pos`` and ``flipped`` are the global batch's, ``x`` its rows ``rows``."""
        target = self.masks[pos.to(self.masks.device)]
        target = torch.where(flipped[:, None, None], target.flip(-1), target)
        sparse, pixels = self.job.labels.sparse, self.cfg.pixels_per_image
        if rows is None:
            loss = scaled = _loss(self.model(x), target, sparse, pixels, self.generator)
        else:  # DDP averages the ranks' gradients, where the global batch's loss is the sum of their shares
            loss = loss_share(self.model(x), target, rows, sparse=sparse, pixels=pixels, generator=self.generator)
            scaled = loss * self.world
        self.optim.zero_grad(set_to_none=True)
        scaled.backward()
        lr = float(self.sched.get_last_lr()[0])  # the rate this step uses
        self.optim.step()
        self.sched.step()
        value = float(loss.detach()) if rows is None else sum_over_ranks(loss.detach())
        self.running = value if math.isnan(self.running) else 0.9 * self.running + 0.1 * value
        self.log.append({"step": n_step, "epoch": epoch, "loss": value, "lr": lr})


def train_heads(
    store: FeatureStore,
    jobs: Sequence[HeadJob],
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    progress: TrainProgress | None = None,
    plan: BatchPlan | None = None,
    ranks: Ranks | None = None,
) -> list[TrainResult]:
    """Train several heads in one pass over the features: each batch is read once and every head takes
    a step on it, with its own labels, optimiser and schedule. The jobs must share a :func:`fuse_key`;
    each head is the one :func:`train_head` gives for its job alone, bit for bit. ``seconds`` of each
    result is the pass's time divided by the number of heads.

    ``plan``: train on the global batches of a :class:`~pipeline.training.data_parallel.BatchPlan`
    instead of shuffled epochs, the features held in memory when they fit (else read from the store
    image by image at each step: :func:`~pipeline.training.data_parallel.held_features`). In one
    process each step takes the whole global batch; under a process group of ``plan.world`` ranks
    (``ranks``, torchrun) each rank takes its own part, holding the tokens of its own shards only, and
    the heads train data-parallel (batch norm, loss normalisation and random draws those of the global
    batch), so both give the same heads to float rounding. A group of several ranks without a plan
    makes one (:meth:`BatchPlan.for_store`).
    Only rank 0 calls ``progress`` and writes run folders; every rank returns the same results."""
    keys = {fuse_key(store, job) for job in jobs}
    if len(keys) > 1:
        raise ConfigError("these heads cannot share a pass: they differ in images, batch size, seed, flip, steps or device")
    first = jobs[0].cfg
    ranks = ranks or Ranks.single()
    if any(job.cfg.tensorboard for job in jobs):
        summary_writer_class()  # a missing package fails before the features are loaded
    device = pick_device(ranks.device(first.device))
    indices = training_images(store, jobs[0].labels)
    total = first.total_steps(len(indices))
    if ranks.world > 1:
        if not ranks.group:
            raise ConfigError("data-parallel training needs the process group torchrun starts, not --part")
        check_one_gpu_each(device)
        plan = plan or BatchPlan.for_store(store, indices, first.batch_size, first.seed, ranks.world)
    if plan is not None:
        _check_plan(plan, len(indices), first.batch_size, ranks.world)
    masks: dict[str, torch.Tensor] = {}  # (n, S, S) uint8 per label set, 255 = ignore; shared by its heads
    for job in jobs:
        if str(job.labels.path) not in masks:
            masks[str(job.labels.path)] = torch.from_numpy(job.labels.masks(indices)).to(device)
    generator = torch.Generator().manual_seed(first.seed)
    use_flip = first.flip and store.n_views > 1
    if plan is None:
        nbytes = len(indices) * store.n_views * store.grid[0] * store.grid[1] * store.channels * 2
        in_memory = first.memory == "ram" or (first.memory == "auto" and fits_in_memory(nbytes, device))
        steps = _epoch_steps(FeatureBatches(store, indices, first.batch_size, device, in_memory), generator, total,
                             use_flip, device)  # fmt: skip
    else:
        held = held_features(store, indices, plan, ranks, device, first.memory)
        in_memory = not isinstance(held[0], StoreRows)
        steps = planned_steps(held, plan, ranks, generator, total, use_flip, device)
    learners = [HeadLearner(job, masks[str(job.labels.path)], store.channels, len(store.layers), num_classes, total,
                            ranks if ranks.world > 1 else None) for job in jobs]  # fmt: skip
    began, step, epochs = time.perf_counter(), 0, 0
    with contextlib.ExitStack() as stack:
        for learner in learners:
            stack.enter_context(learner.log)
        for epochs, pos, x, flipped, rows in steps:
            step += 1
            for learner in learners:
                learner.step(x, pos, flipped, step, epochs, rows)
            if progress and ranks.is_main:
                progress(step, total, learners[0].running)
    seconds = (time.perf_counter() - began) / len(learners)
    results = []
    for learner in learners:
        learner.head.eval()
        result = TrainResult(learner.job.run_dir, step, epochs, len(indices), seconds, in_memory, learner.log.history)
        if ranks.is_main:
            write_run(learner.job.run_dir, learner.head, learner.cfg, store, learner.job.labels, num_classes, result,
                      device=str(device), heads_in_pass=len(learners), class_names=class_names,
                      processes=ranks.world)  # fmt: skip
        results.append(result)
    return results


def _check_plan(plan: BatchPlan, images: int, batch_size: int, world: int) -> None:
    if plan.images != images or plan.batch_size != batch_size or world not in (1, plan.world):
        raise ConfigError(
            f"the batch plan ({plan.images} images, batch size {plan.batch_size}, {plan.world} ranks) does not fit "
            f"this training ({images} images, batch size {batch_size}, {world} processes)"
        )


def _epoch_steps(
    batches: FeatureBatches, generator: torch.Generator, total: int, use_flip: bool, device: torch.device
) -> Iterator[Step]:
    """``total`` steps of shuffled epochs (the batches' own order), each batch's views drawn from ``generator``."""
    step, epochs = 0, 0
    while step < total:
        epochs += 1
        for pos, tokens in batches.epoch(generator):
            if step == total:
                break
            n = len(pos)
            view = torch.randint(0, 2, (n,), generator=generator) if use_flip else torch.zeros(n, dtype=torch.long)
            x = tokens[torch.arange(n, device=device), view.to(device)]
            step += 1
            yield epochs, pos, x, (view == 1).to(device), None


def _loss(
    logits: torch.Tensor, target: torch.Tensor, sparse: bool, pixels: int | None, generator: torch.Generator
) -> torch.Tensor:
    if sparse:
        return sparse_loss(logits, target)
    if pixels is not None:
        return subsampled_dense_loss(logits, target, pixels, generator)
    return dense_loss(logits, target)


def write_run(
    run_dir: Path,
    head: torch.nn.Module,
    cfg: TrainConfig,
    store: FeatureStore,
    labels: LabelSet,
    num_classes: int,
    result: TrainResult,
    *,
    device: str | None = None,
    heads_in_pass: int = 1,
    class_names: Sequence[str] | None = None,
    processes: int = 1,
) -> None:
    """head.safetensors, config.json (train + head config, the fingerprints used and the environment:
    command line, versions, ``device``, git commit), history.json, curve.png."""
    from pipeline.figures.plots import curve_figure

    files = RunFiles(run_dir)
    files.dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(files.head))
    config: dict[str, Any] = {
        "train": cfg.to_dict(),
        "head": head.config,
        "num_classes": num_classes,
        "classes": list(class_names) if class_names is not None and len(class_names) == num_classes else None,
        "store": {"path": str(store.path), "fingerprint": store.fingerprint(), "identity": store.identity.for_heads(),
                  "size": store.identity.size, "extract_config": store.attrs.get("extract_config")},
        "labels": {"name": labels.name, "kind": labels.kind, "path": str(labels.path), "fingerprint": labels.fingerprint},
        "result": {"steps": result.steps, "epochs": result.epochs, "images": result.images,
                   "seconds": round(result.seconds, 3), "in_memory": result.in_memory, "heads_in_pass": heads_in_pass,
                   "processes": processes},
        "environment": environment(device),
    }  # fmt: skip
    files.config.write_text(json.dumps(config, indent=2))
    files.history.write_text(json.dumps(result.history))
    curve_figure({"loss": result.history["loss"], "lr": result.history["lr"]}, files.curve)
