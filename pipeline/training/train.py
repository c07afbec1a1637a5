"""Stage two: train a light head on cached patch tokens with (imperfect) labels.

Usage::

    store = FeatureStore.open("cache/dinov2_vitl14-448-last/train.zarr")
    labels = ensure_labels(source, store, num_classes=21)     # the imported label set
    result = train_head(store, labels, TrainConfig(labels="eps"), Path("runs/eps-bn-linear"))

The features are loaded once into memory (GPU memory when training on a GPU) when they fit, else
streamed shard by shard with shard-aligned shuffling; the choice is made here, not by the user.
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

from pipeline.cache.labels import LabelSet
from pipeline.cache.names import ImageStatus, RunFiles
from pipeline.cache.store import FeatureStore
from pipeline.config import TrainConfig
from pipeline.devices import fits_in_memory, pick_device
from pipeline.errors import ConfigError, LabelError
from pipeline.heads import build_head
from pipeline.provenance import environment
from pipeline.training.losses import dense_loss, sparse_loss, subsampled_dense_loss
from pipeline.training.steplog import StepLog, summary_writer_class

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


class FeatureBatches:
    """Batches of (positions into ``indices``, tokens (b, V, h, w, C) float16 on the device).

    Streamed batches on the CPU may be views of the store's reused shard buffer: use each batch
    before asking for the next (the training loop does).
    """

    def __init__(self, store: FeatureStore, indices: np.ndarray, batch_size: int, device: torch.device, in_memory: bool):
        self.store, self.indices, self.batch_size, self.device = store, indices, batch_size, device
        self.in_memory = in_memory
        self.tokens: torch.Tensor | None = None
        if in_memory:
            self.tokens = self._load_all()

    def _load_all(self, per_read: int = 8) -> torch.Tensor:
        """All training tokens into one tensor on the device, read a few consecutive images per call
        into a reused buffer (large single reads are slow: cache_layout.md, "Shard size")."""
        shape = (len(self.indices), self.store.n_views, *self.store.grid, self.store.channels)
        out = torch.empty(shape, dtype=torch.float16, device=self.device)
        buffer = np.empty((per_read, *shape[1:]), dtype=np.float16)
        pos = 0
        while pos < len(self.indices):
            start = int(self.indices[pos])
            n = 1
            while n < per_read and pos + n < len(self.indices) and self.indices[pos + n] == start + n:
                n += 1
            self.store.read_tokens(start, start + n, out=buffer[:n])
            out[pos : pos + n] = torch.from_numpy(buffer[:n]).to(self.device)
            pos += n
        return out

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.tokens is not None:
            order = torch.randperm(len(self.indices), generator=generator)
            for i in range(0, len(order), self.batch_size):
                pos = order[i : i + self.batch_size]
                yield pos, self.tokens[pos.to(self.device)]
            return
        yield from self._stream(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))

    def _stream(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in shard-aligned shuffled order; each batch is gathered from the store's reused
        shard buffer with one copy (a batch may span two shards)."""
        position = np.full(self.store.n_images, -1, dtype=np.int64)
        position[self.indices] = np.arange(len(self.indices))
        pending_pos = np.empty(0, dtype=np.int64)
        pending: np.ndarray | None = None
        for idx, tokens in self.store.iter_shards(shuffle_seed=seed):
            pos = position[idx]
            rows = np.flatnonzero(pos >= 0)
            if pending is not None:  # complete the batch left over from the previous shard
                take = rows[: self.batch_size - len(pending_pos)]
                rows = rows[len(take) :]
                pending = np.concatenate([pending, tokens[take]])
                pending_pos = np.concatenate([pending_pos, pos[take]])
                if len(pending_pos) < self.batch_size:
                    continue
                yield self._to_batch(pending_pos, pending)
                pending, pending_pos = None, np.empty(0, dtype=np.int64)
            full = len(rows) - len(rows) % self.batch_size
            for i in range(0, full, self.batch_size):
                take = rows[i : i + self.batch_size]
                if take[-1] - take[0] == len(take) - 1:  # a run of the shuffled shard buffer: no copy
                    yield self._to_batch(pos[take], tokens[take[0] : take[-1] + 1])
                else:
                    yield self._to_batch(pos[take], tokens[take])  # one copy
            if full < len(rows):
                pending, pending_pos = tokens[rows[full:]], pos[rows[full:]]  # fancy indexing copies
        if pending is not None and len(pending_pos):
            yield self._to_batch(pending_pos, pending)

    def _to_batch(self, pos: np.ndarray, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(pos), torch.from_numpy(tokens).to(self.device, non_blocking=True)


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
) -> TrainResult:
    """Train ``cfg.head`` on ``store``'s tokens and ``labels`` and write the run folder (see README):
    metrics.csv as training goes (and TensorBoard events with ``cfg.tensorboard``), the rest at the end."""
    job = HeadJob(labels, cfg, run_dir)
    return train_heads(store, [job], num_classes=num_classes, class_names=class_names, progress=progress)[0]


#: Offset of the seed of a head's own random stream (the pixels its loss samples) from ``cfg.seed``.
LOSS_SEED_OFFSET = 2**31


def fuse_key(store: FeatureStore, job: HeadJob) -> tuple[Any, ...]:
    """Jobs with equal keys can share one pass over the features (:func:`train_heads`): the same
    training images, batches, views and number of steps."""
    cfg = job.cfg
    indices = training_images(store, job.labels)
    steps = cfg.total_steps(len(indices))
    return (str(store.path), indices.tobytes(), cfg.batch_size, cfg.seed, cfg.flip, steps, cfg.device, cfg.memory)


class HeadLearner:
    """One head with its optimiser, schedule, labels on the device and step log."""

    def __init__(self, job: HeadJob, masks: torch.Tensor, channels: int, n_layers: int, num_classes: int, total: int):
        cfg = self.cfg = job.cfg
        self.job, self.masks = job, masks
        torch.manual_seed(cfg.seed)  # the head's initial weights, as a separate run draws them
        self.head = build_head(cfg.head, channels, num_classes, n_layers=n_layers).to(masks.device)
        self.optim = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        factor = lr_lambda(cfg.schedule, total, cfg.warmup_steps(total), cfg.poly_power)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, factor)
        self.log = StepLog(job.run_dir, tensorboard=cfg.tensorboard)
        # The loss's random pixels come from the head's own stream, so heads sharing a pass do not
        # shift each other's draws (or the shared batch order).
        self.generator = torch.Generator().manual_seed(cfg.seed + LOSS_SEED_OFFSET)
        self.running = float("nan")
        self.head.train()

    def step(self, x: torch.Tensor, pos: torch.Tensor, flipped: torch.Tensor, n_step: int, epoch: int) -> None:
        """One optimiser step on tokens ``x`` (b, h, w, C) of images ``pos``, some seen mirrored."""
        target = self.masks[pos.to(self.masks.device)]
        target = torch.where(flipped[:, None, None], target.flip(-1), target)
        loss = _loss(self.head(x), target, self.job.labels.sparse, self.cfg.pixels_per_image, self.generator)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        lr = float(self.sched.get_last_lr()[0])  # the rate this step uses
        self.optim.step()
        self.sched.step()
        value = float(loss.detach())
        self.running = value if math.isnan(self.running) else 0.9 * self.running + 0.1 * value
        self.log.append({"step": n_step, "epoch": epoch, "loss": value, "lr": lr})


def train_heads(
    store: FeatureStore,
    jobs: Sequence[HeadJob],
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    progress: TrainProgress | None = None,
) -> list[TrainResult]:
    """Train several heads in one pass over the features: each batch is read once and every head takes
    a step on it, with its own labels, optimiser and schedule. The jobs must share a :func:`fuse_key`;
    each head is the one :func:`train_head` gives for its job alone, bit for bit. ``seconds`` of each
    result is the pass's time divided by the number of heads."""
    keys = {fuse_key(store, job) for job in jobs}
    if len(keys) > 1:
        raise ConfigError("these heads cannot share a pass: they differ in images, batch size, seed, flip, steps or device")
    first = jobs[0].cfg
    if any(job.cfg.tensorboard for job in jobs):
        summary_writer_class()  # a missing package fails before the features are loaded
    device = pick_device(first.device)
    indices = training_images(store, jobs[0].labels)
    nbytes = len(indices) * store.n_views * store.grid[0] * store.grid[1] * store.channels * 2
    in_memory = first.memory == "ram" or (first.memory == "auto" and fits_in_memory(nbytes, device))
    total = first.total_steps(len(indices))
    masks: dict[Path, torch.Tensor] = {}  # (n, S, S) uint8 per label set, 255 = ignore; shared by its heads
    learners = []
    for job in jobs:
        if job.labels.path not in masks:
            masks[job.labels.path] = torch.from_numpy(job.labels.masks(indices)).to(device)
        learners.append(HeadLearner(job, masks[job.labels.path], store.channels, len(store.layers), num_classes, total))
    batches = FeatureBatches(store, indices, first.batch_size, device, in_memory)
    generator = torch.Generator().manual_seed(first.seed)
    use_flip = first.flip and store.n_views > 1
    began, step, epochs = time.perf_counter(), 0, 0
    with contextlib.ExitStack() as stack:
        for learner in learners:
            stack.enter_context(learner.log)
        while step < total:
            epochs += 1
            for pos, tokens in batches.epoch(generator):
                if step == total:
                    break
                n = len(pos)
                view = torch.randint(0, 2, (n,), generator=generator) if use_flip else torch.zeros(n, dtype=torch.long)
                x = tokens[torch.arange(n, device=device), view.to(device)]
                step += 1
                for learner in learners:
                    learner.step(x, pos, (view == 1).to(device), step, epochs)
                if progress:
                    progress(step, total, learners[0].running)
    seconds = (time.perf_counter() - began) / len(learners)
    results = []
    for learner in learners:
        learner.head.eval()
        result = TrainResult(learner.job.run_dir, step, epochs, len(indices), seconds, in_memory, learner.log.history)
        write_run(learner.job.run_dir, learner.head, learner.cfg, store, learner.job.labels, num_classes, result,
                  device=str(device), heads_in_pass=len(learners), class_names=class_names)  # fmt: skip
        results.append(result)
    return results


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
                   "seconds": round(result.seconds, 3), "in_memory": result.in_memory, "heads_in_pass": heads_in_pass},
        "environment": environment(device),
    }  # fmt: skip
    files.config.write_text(json.dumps(config, indent=2))
    files.history.write_text(json.dumps(result.history))
    curve_figure({"loss": result.history["loss"], "lr": result.history["lr"]}, files.curve)
