"""A PyTorch ``Dataset`` over a feature store and its label sets, for your own training loops.

Usage::

    ds = StoreDataset("cache/dinov2_vitl14-448-last/train.zarr", labels, view="random")
    sampler = ShardShuffleSampler(ds, seed=0)
    loader = DataLoader(ds, batch_size=16, sampler=sampler, num_workers=2)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            batch["tokens"], batch["mask"]       # (B, h, w, C) float16, (B, S, S) uint8 (255 = ignore)

Item ``i`` is a dict (shapes as in cache_layout.md; ``default_collate`` stacks them along B):

- ``"tokens"``: (h, w, C) float16, one view of the image's token grid;
- ``"view"``: int, the view read (``"random"`` draws one per item from torch's RNG);
- ``"mask"``: (S, S) uint8 canvas labels, 255 = ignore, flipped to match an ``hflip`` view; with a
  sequence of label sets ``"masks"`` instead: {set name: (S, S) uint8};
- ``"geometry"``: (6,) int32, the store's row in GEOMETRY_COLUMNS order, of the original view
  (:meth:`StoreDataset.geometry` gives it as a :class:`Geometry`);
- ``"id"``: str, the image id; ``"index"``: int, the image's index in the store.

By default only images whose status is OK are indexed (failed and unwritten images have zero tokens),
and with label sets only those that every set labels (at least one pixel not 255); ``indices=``
chooses others. Reading: the dataset reads a whole shard at once (all its images and views, one
file, read straight through the shard index) and keeps it, one shard per worker process, so a
shard-aligned order (:class:`ShardShuffleSampler`) reads each shard once per worker that touches it
instead of once per item. That costs one shard of memory per worker (about 128 MiB by default:
``FeatureStore.images_per_shard``); with a plain random order pass ``cache_shard=False``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.cache.geometry import Geometry
from pipeline.cache.labels import LabelSet
from pipeline.cache.names import ImageStatus, StrPath
from pipeline.cache.store import FeatureStore
from pipeline.errors import ConfigError, LabelError, StoreMismatchError


class StoreDataset(Dataset[dict[str, Any]]):
    """Items of a feature store (and label sets) by position; see the module docstring for the keys.

    Picklable and fork-safe: only paths and small per-image arrays are kept; each process opens the
    store itself on first read. Attributes: ``path``, ``indices`` (store index of each position),
    ``shards`` (shard of each position), ``ids``, ``views``, ``size``, ``label_names``.
    """

    def __init__(
        self,
        store: FeatureStore | StrPath,
        labels: LabelSet | Sequence[LabelSet] | None = None,
        *,
        view: int | Literal["random"] = 0,
        indices: Sequence[int] | np.ndarray | None = None,
        cache_shard: bool = True,
    ) -> None:
        opened = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        self.path, self.ids, self.views, self.size = opened.path, opened.ids, opened.views, opened.size
        self._single = isinstance(labels, LabelSet)
        self.labels: list[LabelSet] = [labels] if isinstance(labels, LabelSet) else list(labels or [])
        self.label_names = [s.name for s in self.labels]
        if len(set(self.label_names)) != len(self.label_names):
            raise ConfigError(f"label sets must have distinct names, got {self.label_names}")
        fingerprint = opened.fingerprint()
        for s in self.labels:
            if s.attrs.get("store_fingerprint") != fingerprint:
                raise StoreMismatchError(
                    f"label set {s.name!r} ({s.path}) was imported for another store than {opened.path}: "
                    "import it for this store with ensure_labels"
                )
        if view != "random" and not (isinstance(view, int) and 0 <= view < opened.n_views):
            raise ConfigError(f"view must be 'random' or an index below {opened.n_views} ({opened.views}), got {view!r}")
        self.view, self.cache_shard = view, cache_shard
        usable = opened.status() == ImageStatus.OK
        for s in self.labels:
            usable &= s.labelled
        self.indices = np.flatnonzero(usable) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if not ((self.indices >= 0) & (self.indices < opened.n_images)).all():
            raise ConfigError(f"indices must lie in [0, {opened.n_images}) for {opened.path}, got {self.indices.tolist()}")
        if not len(self.indices):
            what = f"OK and labelled by {self.label_names}" if self.labels else "OK (extracted)"
            raise LabelError(f"none of the {opened.n_images} images of {opened.path} is {what}")
        self.shards = self.indices // opened.images_per_shard
        self._geometry = opened.geometry()
        self._store: FeatureStore | None = opened
        self._pid = os.getpid()
        self._cached: tuple[int, np.ndarray, list[np.ndarray]] | None = None  # shard, tokens, masks per set

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        # Open zarr handles and the cached shard stay behind; the worker opens its own.
        return {**self.__dict__, "_store": None, "_cached": None}

    @property
    def store(self) -> FeatureStore:
        """The store, opened in this process on first use (a forked worker reopens it)."""
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid, self._cached = FeatureStore.open(self.path), os.getpid(), None
        return self._store

    def geometry(self, position: int) -> Geometry:
        return Geometry.from_row(self._geometry[self.indices[position]], canvas=self.size)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = int(self.indices[position])
        view = int(torch.randint(len(self.views), ()).item()) if self.view == "random" else int(self.view)
        if self.cache_shard:
            start, tokens, masks = self._shard(int(self.shards[position]))
            token = tokens[index - start, view].copy()  # the shard buffer is reused for the next shard
            mask = [m[index - start].copy() for m in masks]  # callers may write into their item
        else:
            token = self.store.read_tokens(index, index + 1, view=view)[0]
            mask = [s.masks(np.array([index]))[0] for s in self.labels]
        if self.views[view] == "hflip":  # labels lie on the original canvas (cache_layout.md)
            mask = [m[:, ::-1] for m in mask]
        item: dict[str, Any] = {"tokens": torch.from_numpy(token), "view": view, "id": self.ids[index], "index": index}
        item["geometry"] = torch.from_numpy(self._geometry[index].copy())
        tensors = [torch.from_numpy(np.ascontiguousarray(m)) for m in mask]
        if self._single:
            item["mask"] = tensors[0]
        elif self.labels:
            item["masks"] = dict(zip(self.label_names, tensors, strict=True))
        return item

    def _shard(self, shard: int) -> tuple[int, np.ndarray, list[np.ndarray]]:
        """(first store index, tokens (n, V, h, w, C), masks [(n, S, S)] per set) of ``shard``, read
        whole on a miss into a buffer reused for every shard (an LRU of one)."""
        store = self.store
        start, stop = store.shard_range(shard)
        if self._cached is None or self._cached[0] != shard:
            shape = (store.images_per_shard, store.n_views, *store.grid, store.channels)
            buf = self._cached[1] if self._cached is not None else np.empty(shape, np.float16)
            n = stop - start
            # The store's direct shard read (several times faster than zarr chunk by chunk);
            # it falls back to zarr itself when the shard is not in the documented layout.
            store._read_shard(shard, start, buf[:n], np.arange(n), 8)
            self._cached = (shard, buf, [s.masks(np.arange(start, stop)) for s in self.labels])
        return start, self._cached[1], self._cached[2]


class ShardShuffleSampler(Sampler[int]):
    """Positions of a :class:`StoreDataset`, one shard after another: the shards in a shuffled order,
    the images of each shard shuffled among themselves, so the dataset reads each shard once (one
    file, one shard read serves every item of it) while the order stays random enough for SGD.

    Deterministic for a ``seed`` and an epoch; call :meth:`set_epoch` before each epoch for a new
    order (as with ``DistributedSampler``). ``shuffle=False`` gives store order.
    """

    def __init__(self, dataset: StoreDataset, *, seed: int = 0, shuffle: bool = True) -> None:
        self.shards, self.seed, self.shuffle, self.epoch = dataset.shards, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def groups(self) -> list[np.ndarray]:
        """This epoch's positions as one array per shard, in reading order."""
        order = np.argsort(self.shards, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(self.shards[order])) + 1)
        if not self.shuffle:
            return groups
        rng = np.random.default_rng((self.seed, self.epoch))
        return [rng.permutation(groups[k]) for k in rng.permutation(len(groups))]

    def __iter__(self) -> Iterator[int]:
        for group in self.groups():
            yield from group.tolist()

    def __len__(self) -> int:
        return len(self.shards)


class ShardBatchSampler(Sampler[list[int]]):
    """Batches of a :class:`ShardShuffleSampler`'s order that never straddle two shards (the last
    batch of a shard may be short, or dropped with ``drop_last``), so with ``num_workers > 0`` every
    batch is served by one shard read in one worker. Pass it as ``DataLoader(batch_sampler=...)``."""

    def __init__(self, sampler: ShardShuffleSampler, batch_size: int, *, drop_last: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for group in self.sampler.groups():
            for i in range(0, len(group), self.batch_size):
                if len(group) - i >= self.batch_size or not self.drop_last:
                    yield group[i : i + self.batch_size].tolist()

    def __len__(self) -> int:
        sizes = np.bincount(self.sampler.shards)
        per = sizes // self.batch_size if self.drop_last else -(-sizes // self.batch_size)
        return int(per.sum())
