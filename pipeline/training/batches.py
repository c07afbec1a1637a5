"""The training reader: batches of cached tokens, from memory or streamed from the store.

Usage::

    batches = FeatureBatches(store, indices, batch_size=16, device=torch.device("cuda"), in_memory=True)
    for pos, tokens in batches.epoch(generator):     # positions into indices, (b, V, h, w, C) float16
        ...
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.cache.store import FeatureStore
from pipeline.errors import ConfigError

#: One training step's (epoch, positions of the global batch (B,), tokens (b, h, w, C) of this process's
#: rows of it, which of the B images are seen mirrored (B,) bool, those rows or None for the whole batch).
Step = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, slice | None]


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

    def take(self, positions: np.ndarray, device: torch.device) -> torch.Tensor:
        """Tokens (b, V, h, w, C) of ``positions`` (into ``indices``) on ``device``; in memory only."""
        if self.tokens is None:
            raise ConfigError("FeatureBatches.take needs the features in memory")
        return self.tokens[torch.from_numpy(positions).to(self.tokens.device)].to(device, non_blocking=True)
