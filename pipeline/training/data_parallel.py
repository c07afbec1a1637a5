"""Data-parallel training of heads under ``torchrun``: which images each rank takes at each step
(:class:`BatchPlan`), the tokens each rank holds and its steps (:func:`held_features`,
:func:`planned_steps`, used by :func:`~pipeline.training.train.train_heads`), and batch norm over the
global batch (:class:`GlobalBatchNorm`). The loss over the global batch: :func:`~pipeline.training.losses.loss_share`.

Usage::

    plan = BatchPlan.for_store(store, indices, batch_size=16, seed=0, world=2)
    for per_rank in plan.steps(total):      # per_rank[r]: positions (into indices) rank r trains on
        ...
    train_heads(store, jobs, num_classes=21, plan=plan)   # one process, on the very same global batches

Each rank holds the tokens of its own shards only (shard ``s`` belongs to rank ``s % world``), and
takes ``batch_size / world`` of them per step from an endless stream of shuffled passes over them:
a rank whose images run out starts its next pass, so every rank makes the same number of steps
(``cfg.total_steps`` of the global image count) and none waits on a collective the others never
reach. When shards divide unevenly, the images of a rank holding fewer are seen a little more often.
The global batch of a step is the ranks' parts in rank order; one process can train on the same
batches (:meth:`BatchPlan.global_batches`), which is how data-parallel training is tested against
single-process training.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from pipeline.cache.store import FeatureStore
from pipeline.devices import fits_in_memory
from pipeline.distributed import Ranks
from pipeline.errors import ConfigError
from pipeline.training.batches import FeatureBatches, Step

log = logging.getLogger(__name__)


def check_batch_split(batch_size: int, world: int) -> None:
    """Refuse a global batch that does not split evenly over ``world`` processes."""
    if batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} does not split evenly over {world} processes; use a multiple of {world}")


def check_one_gpu_each(device: torch.device) -> None:
    """Refuse data-parallel training on CUDA with more processes on this node than GPUs: NCCL, which
    carries the gradients, takes one GPU per process (``LOCAL_WORLD_SIZE``, set by torchrun)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda" and local > torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(
            f"{local} processes on this node share {count} GPU(s), and NCCL needs one GPU per process: "
            f"start torchrun with --nproc_per_node={count}"
        )


@dataclass(frozen=True)
class BatchPlan:
    """The global batches of data-parallel training (module docstring). ``owned[r]``: the positions
    (into the training images) whose tokens rank ``r`` holds; ``batch_size``: images per global step."""

    owned: tuple[np.ndarray, ...]
    batch_size: int
    seed: int

    @classmethod
    def for_store(cls, store: FeatureStore, indices: np.ndarray, batch_size: int, seed: int, world: int) -> BatchPlan:
        """Shards dealt round-robin over ``world`` ranks; ``indices`` are the store indices of the
        training images (:func:`~pipeline.training.train.training_images`)."""
        check_batch_split(batch_size, world)
        owner = (np.asarray(indices) // store.images_per_shard) % world
        owned = tuple(np.flatnonzero(owner == r) for r in range(world))
        empty = [r for r, mine in enumerate(owned) if not len(mine)]
        if empty:
            raise ConfigError(
                f"rank {empty[0]} of {world} would hold none of the {len(indices)} training images "
                f"({store.n_shards} shards of {store.images_per_shard}, dealt round-robin); use fewer processes"
            )
        return cls(owned, batch_size, seed)

    @property
    def world(self) -> int:
        return len(self.owned)

    @property
    def per_rank(self) -> int:
        return self.batch_size // self.world

    @property
    def images(self) -> int:
        return sum(len(mine) for mine in self.owned)

    @property
    def steps_per_epoch(self) -> int:
        """Steps per pass over the global image count (what one process would make)."""
        return math.ceil(self.images / self.batch_size)

    def epoch_of(self, step: int) -> int:
        """The (1-based) epoch that (1-based) ``step`` counts towards."""
        return (step - 1) // self.steps_per_epoch + 1

    def rank_batches(self, rank: int) -> Iterator[np.ndarray]:
        """Rank ``rank``'s endless stream of ``per_rank`` positions per step: its images in a new
        shuffled order each pass (``numpy`` generator seeded by (seed, rank, pass)), a step's
        part running on into the next pass when the current one ends."""
        mine, n = self.owned[rank], self.per_rank
        carry = np.empty(0, dtype=np.int64)
        passes = 0
        while True:
            order = np.concatenate([carry, np.random.default_rng((self.seed, rank, passes)).permutation(mine)])
            passes += 1
            full = len(order) - len(order) % n
            for i in range(0, full, n):
                yield order[i : i + n]
            carry = order[full:]

    def steps(self, total: int) -> Iterator[list[np.ndarray]]:
        """``total`` steps, each a list of every rank's positions."""
        streams = [self.rank_batches(r) for r in range(self.world)]
        for _ in range(total):
            yield [next(stream) for stream in streams]

    def global_batches(self, total: int) -> Iterator[np.ndarray]:
        """``total`` global batches: the ranks' parts of each step, concatenated in rank order."""
        for parts in self.steps(total):
            yield np.concatenate(parts)


class GlobalBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the global batch over all ranks (two
    differentiable all-reduces: the sum, then the sum of squared deviations from the global mean),
    so a data-parallel head normalises as one process would. Unlike ``torch.nn.SyncBatchNorm`` it
    runs on the CPU (gloo) too. In eval mode, or without a process group, it is ``BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        dist.all_reduce(count)
        n = float(count.item())
        mean = dist_fn.all_reduce(x.sum(dim=(0, 2, 3))) / n
        centred = x - mean[None, :, None, None]
        var = dist_fn.all_reduce(centred.square().sum(dim=(0, 2, 3))) / n  # biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                tracked = self.num_batches_tracked
                if tracked is not None:
                    tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(tracked if tracked is not None else 1)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / max(n - 1, 1.0), factor)  # unbiased, as BatchNorm keeps it
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


def global_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` inside ``module`` (in place) by a :class:`GlobalBatchNorm` with the
    same settings, parameters and statistics; the state dict keys stay the same. Returns ``module``.
    Call it before moving the module to its device (the new layers are made on the CPU)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            swapped = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            swapped.load_state_dict(child.state_dict())
            setattr(module, name, swapped)
        else:
            global_batch_norm(child)
    return module


class StoreRows:
    """The tokens of training images read from the store at every step, image by image (one view of
    a ViT-L image at 448 is 2 MiB): for a share of the data that fits neither in device memory nor in
    RAM, or with ``memory="stream"``. Same interface as the in-memory :class:`FeatureBatches`."""

    def __init__(self, store: FeatureStore, indices: np.ndarray) -> None:
        self.store, self.indices = store, indices

    def take(self, positions: np.ndarray, device: torch.device) -> torch.Tensor:
        """Tokens (b, V, h, w, C) of ``positions`` (into ``indices``) on ``device``."""
        out = np.empty((len(positions), self.store.n_views, *self.store.grid, self.store.channels), np.float16)
        for row, position in enumerate(positions.tolist()):
            index = int(self.indices[position])
            self.store.read_tokens(index, index + 1, out=out[row : row + 1])
        return torch.from_numpy(out).to(device, non_blocking=True)


Held = tuple[FeatureBatches | StoreRows, np.ndarray]


def held_features(
    store: FeatureStore, indices: np.ndarray, plan: BatchPlan, ranks: Ranks, device: torch.device, memory: str = "auto"
) -> Held:
    """The tokens a process holds for ``plan`` (this rank's shards, or all in one process) and the row
    of each training position among them (-1: not held). ``memory`` "auto": on ``device`` when they fit,
    else in RAM when they fit there, else read from the store at each step (:class:`StoreRows`); "ram"
    and "stream" force one. A rank that fails to read them makes every rank stop
    (:meth:`Ranks.check`) before anything is written."""
    mine = plan.owned[ranks.rank] if ranks.world > 1 else np.arange(len(indices))
    local = np.full(len(indices), -1, dtype=np.int64)
    local[mine] = np.arange(len(mine))
    cpu = torch.device("cpu")
    try:
        nbytes = len(mine) * store.n_views * store.grid[0] * store.grid[1] * store.channels * 2
        home: torch.device | None = cpu if memory == "ram" else None
        if memory == "auto":
            home = device if fits_in_memory(nbytes, device) else cpu if fits_in_memory(nbytes, cpu) else None
        batches: FeatureBatches | StoreRows = (
            StoreRows(store, indices[mine]) if home is None else FeatureBatches(store, indices[mine], plan.per_rank, home, True)
        )
        where = "read from the store at each step" if home is None else f"held on {home}"
        log.info("%s: %d of %d training images, %s", ranks.label or "this process", len(mine), len(indices), where)
    except Exception as exc:
        ranks.check(exc, "reading the features")  # the others learn of it and stop too; this re-raises
        raise
    ranks.check(None, "reading the features")
    return batches, local


def planned_steps(
    held: Held, plan: BatchPlan, ranks: Ranks, generator: torch.Generator, total: int,
    use_flip: bool, device: torch.device,
) -> Iterator[Step]:  # fmt: skip
    """``total`` steps of ``plan`` on the ``held`` features (:func:`held_features`): in one process whole
    global batches, else this rank's rows of them. The views are drawn for the whole global batch, so
    every rank makes the draws one process would."""
    batches, local = held
    parallel, b = ranks.world > 1, plan.per_rank
    for step, parts in enumerate(plan.steps(total), 1):
        pos = np.concatenate(parts)
        rows = slice(ranks.rank * b, (ranks.rank + 1) * b) if parallel else slice(0, len(pos))
        tokens = batches.take(local[pos[rows]], device)
        view = torch.randint(0, 2, (len(pos),), generator=generator) if use_flip else torch.zeros(len(pos), dtype=torch.long)
        x = tokens[torch.arange(len(tokens), device=device), view[rows].to(device)]
        yield plan.epoch_of(step), torch.from_numpy(pos), x, (view == 1).to(device), rows if parallel else None


def sum_over_ranks(value: torch.Tensor) -> float:
    """The sum of ``value`` over the ranks of the process group."""
    total = value.clone()
    dist.all_reduce(total)
    return float(total)
