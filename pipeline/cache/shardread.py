"""Direct reads of whole images from the uncompressed zarr v3 shards of a feature store.

The ``tokens`` array (cache_layout.md) is sharded and uncompressed, with the shard index at the end:
every chunk (one view of one image) is a plain little-endian float16 block in its shard file, located
by the index. Reading them with ``os.preadv`` into a reused buffer skips zarr-python's per-chunk
pipeline, which is several times slower on this layout (BENCHMARKS.md, "Streaming"). Anything that
does not look exactly like that (another codec chain, a damaged index, a missing chunk) is left to
zarr: :meth:`ShardReader.read` returns False and the caller reads it the usual way.

Usage (inside :class:`pipeline.cache.store.FeatureStore`)::

    reader = ShardReader.for_array(path / "tokens", codecs, images_per_shard, views, 5, chunk_bytes)
    if reader is None or not reader.read(shard, n, out):
        ...  # read through zarr
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import google_crc32c  # zarr's own dependency (its crc32c codec)
import numpy as np

log = logging.getLogger(__name__)

INDEX_ENTRY = 16  # (offset, nbytes) as two little-endian uint64
CHECKSUM = 4  # crc32c of the index, little-endian uint32
EXPECTED_CODECS = {
    "name": "sharding_indexed",
    "inner": [{"name": "bytes", "configuration": {"endian": "little"}}],
    "index": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
    "index_location": "end",
}


class ShardReader:
    """Reads the images of a shard straight from its file, through the shard index."""

    def __init__(self, array_dir: Path, images_per_shard: int, views: int, ndim: int, chunk_bytes: int):
        self.array_dir, self.images_per_shard, self.views = array_dir, images_per_shard, views
        self.ndim, self.chunk_bytes = ndim, chunk_bytes

    @classmethod
    def for_array(
        cls, array_dir: Path, codecs: list[dict[str, Any]], images_per_shard: int, views: int, ndim: int, chunk_bytes: int
    ) -> ShardReader | None:
        """A reader when ``codecs`` (the array's metadata, as a list of dicts) is the uncompressed
        layout of cache_layout.md, else None."""
        if len(codecs) != 1 or codecs[0].get("name") != EXPECTED_CODECS["name"]:
            return None
        conf = codecs[0].get("configuration", {})
        if (
            _plain(conf.get("codecs")) != EXPECTED_CODECS["inner"]
            or _plain(conf.get("index_codecs")) != EXPECTED_CODECS["index"]
            or conf.get("index_location", "end") != EXPECTED_CODECS["index_location"]
        ):
            return None
        return cls(array_dir, images_per_shard, views, ndim, chunk_bytes)

    def shard_file(self, shard: int) -> Path:
        """``<array>/c/<shard>/0/0/...`` (default chunk key encoding, one shard along every other axis)."""
        return self.array_dir.joinpath("c", str(shard), *["0"] * (self.ndim - 1))

    def read(self, shard: int, n: int, out: np.ndarray, per_read: int = 8, rows: np.ndarray | None = None) -> bool:
        """Fill ``out`` ((n, V, h, w, C) float16, C-contiguous) with the shard's first n images, image
        i at row ``rows[i]`` (default: row i), so a shuffled copy costs nothing extra.

        zarr lays the chunks of a shard out in its own order (not image by image), so the chunks are
        read in file order, each run of adjacent chunks (up to ``per_read`` images' worth) with one
        ``preadv`` scattering into the chunks' places in ``out``. Returns False, having read nothing
        usable, when the shard cannot be read directly."""
        try:
            fd = os.open(self.shard_file(shard), os.O_RDONLY)
        except OSError:
            return False
        try:
            offsets = self._offsets(fd, n)
            if offsets is None:
                return False
            chunks = out.reshape(n * self.views, -1).view(np.uint8)  # chunk j = image j // V, view j % V
            dest = np.arange(n * self.views)
            if rows is not None:
                dest = (np.asarray(rows)[:, None] * self.views + np.arange(self.views)).ravel()
            order = np.argsort(offsets, kind="stable")
            limit = per_read * self.views
            i = 0
            while i < len(order):
                j = i + 1
                while j < len(order) and j - i < limit and offsets[order[j]] == offsets[order[j - 1]] + self.chunk_bytes:
                    j += 1
                buffers = [chunks[dest[k]].data for k in order[i:j]]
                if os.preadv(fd, buffers, int(offsets[order[i]])) != (j - i) * self.chunk_bytes:
                    return False
                i = j
            return True
        finally:
            os.close(fd)

    def _offsets(self, fd: int, n: int) -> np.ndarray | None:
        """(n * V,) byte offsets of the first n images' chunks, from the shard index; None when the
        index is damaged or a chunk is missing or not a whole uncompressed chunk."""
        entries = self.images_per_shard * self.views
        size = os.fstat(fd).st_size
        index_size = entries * INDEX_ENTRY + CHECKSUM
        if size < index_size:
            return None
        raw = os.pread(fd, index_size, size - index_size)
        if google_crc32c.value(raw[:-CHECKSUM]) != int.from_bytes(raw[-CHECKSUM:], "little"):
            log.warning("%s: shard index checksum mismatch; reading it through zarr", self.array_dir)
            return None
        index = np.frombuffer(raw[:-CHECKSUM], dtype="<u8").reshape(entries, 2)[: n * self.views]
        offsets, lengths = index[:, 0].astype(np.int64), index[:, 1]
        data_end = size - index_size
        if (lengths != self.chunk_bytes).any() or (index[:, 0] > data_end - self.chunk_bytes).any():
            return None  # missing (2**64 - 1) or foreign chunks
        return offsets


def _plain(codecs: Any) -> list[dict[str, Any]] | None:
    """Codec descriptions as plain lists/dicts (zarr gives tuples), for comparison."""
    if codecs is None:
        return None
    return [{k: (dict(v) if isinstance(v, dict) else v) for k, v in dict(c).items()} for c in codecs]
