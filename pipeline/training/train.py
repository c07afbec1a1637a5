"""Stage two: train a light head on cached patch tokens with (imperfect) labels.

Usage::

    store = FeatureStore.open("cache/dinov2_vitl14-448-last/train.zarr")
    labels = ensure_labels(source, store, num_classes=21)     # the imported label set
    result = train_head(store, labels, TrainConfig(labels="eps"), Path("runs/eps-bn-linear"))

The features are loaded once into memory (GPU memory when training on a GPU) when they fit, else
streamed shard by shard with shard-aligned shuffling; the choice is made here, not by the user.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
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
from pipeline.errors import LabelError
from pipeline.heads import build_head
from pipeline.training.losses import dense_loss, sparse_loss, subsampled_dense_loss

log = logging.getLogger(__name__)

#: The warm-up's multiplier at step 0, rising linearly to 1 (the official config's ``warmup_ratio``).
WARMUP_RATIO = 1e-6
#: Called with (step, total steps, running loss).
TrainProgress = Callable[[int, int, float], None]


@dataclass
class TrainResult:
    """``steps`` optimiser steps made; ``epochs`` passes over the training images made, the last one
    possibly cut short; ``history`` per step: "step", "loss" and "lr" (the rate that step used)."""

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


def train_head(
    store: FeatureStore,
    labels: LabelSet,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    num_classes: int,
    progress: TrainProgress | None = None,
) -> TrainResult:
    """Train ``cfg.head`` on ``store``'s tokens and ``labels`` and write the run folder (see README)."""
    device = pick_device(cfg.device)
    indices = training_images(store, labels)
    masks = torch.from_numpy(labels.masks(indices)).to(device)  # (n, S, S) uint8, 255 = ignore
    nbytes = len(indices) * store.n_views * store.grid[0] * store.grid[1] * store.channels * 2
    in_memory = cfg.memory == "ram" or (cfg.memory == "auto" and fits_in_memory(nbytes, device))
    torch.manual_seed(cfg.seed)
    head = build_head(cfg.head, store.channels, num_classes, n_layers=len(store.layers)).to(device)
    batches = FeatureBatches(store, indices, cfg.batch_size, device, in_memory)
    total = cfg.total_steps(len(indices))
    factor = lr_lambda(cfg.schedule, total, cfg.warmup_steps(total), cfg.poly_power)
    optim = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, factor)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: dict[str, list[float]] = {"step": [], "loss": [], "lr": []}
    use_flip = cfg.flip and store.n_views > 1
    began, step, running = time.perf_counter(), 0, float("nan")
    head.train()
    epochs = 0
    while step < total:
        epochs += 1
        for pos, tokens in batches.epoch(generator):
            if step == total:
                break
            view = torch.randint(0, 2, (len(pos),), generator=generator) if use_flip else torch.zeros(len(pos), dtype=torch.long)
            target = masks[pos.to(device)]
            flipped = (view == 1).to(device)
            target = torch.where(flipped[:, None, None], target.flip(-1), target)
            logits = head(tokens[torch.arange(len(pos), device=device), view.to(device)])
            loss = _loss(logits, target, labels.sparse, cfg.pixels_per_image, generator)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            history["lr"].append(float(sched.get_last_lr()[0]))  # the rate this step uses
            optim.step()
            sched.step()
            step += 1
            value = float(loss.detach())
            running = value if math.isnan(running) else 0.9 * running + 0.1 * value
            history["step"].append(step)
            history["loss"].append(value)
            if progress:
                progress(step, total, running)
    head.eval()
    result = TrainResult(run_dir, step, epochs, len(indices), time.perf_counter() - began, in_memory, history)
    write_run(run_dir, head, cfg, store, labels, num_classes, result)
    return result


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
) -> None:
    """head.safetensors, config.json (train + head config and the fingerprints used), history.json, curve.png."""
    from pipeline.figures.plots import curve_figure

    files = RunFiles(run_dir)
    files.dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(files.head))
    config: dict[str, Any] = {
        "train": cfg.to_dict(),
        "head": head.config,
        "num_classes": num_classes,
        "store": {"path": str(store.path), "fingerprint": store.fingerprint(), "identity": store.identity.for_heads(),
                  "size": store.identity.size, "extract_config": store.attrs.get("extract_config")},
        "labels": {"name": labels.name, "kind": labels.kind, "path": str(labels.path), "fingerprint": labels.fingerprint},
        "result": {"steps": result.steps, "epochs": result.epochs, "images": result.images,
                   "seconds": round(result.seconds, 3), "in_memory": result.in_memory},
    }  # fmt: skip
    files.config.write_text(json.dumps(config, indent=2))
    files.history.write_text(json.dumps(result.history))
    curve_figure({"loss": result.history["loss"], "lr": result.history["lr"]}, files.curve)
