"""Direct reads of whole images from the uncompressed zarr v3 shards of a feature store.

The ``tokens`` array (cache_layout.md) is sharded and uncompressed, with the shard index at the end:
every chunk (one view of one image) is a plain little-endian float16 block in its shard file, located
by the index. Reading them with ``os.preadv`` into a reused buffer skips zarr-python's per-chunk
pipeline, which is several times slower on this layout (BENCHMARKS.md, "Streaming"). The layout is
checked against the array's ``zarr.json`` (the zarr v3 format, not zarr-python's internals): dtype,
byte order, chunk and shard shapes, chunk key encoding, codec chain and index location. Anything that
does not look exactly like that (another codec chain or chunking, a damaged index, a missing chunk)
is left to zarr: :meth:`ShardReader.for_array` gives None, or :meth:`ShardReader.read` returns False,
and the caller reads it the usual way. Either way a log record says which path was taken and why
(its ``read_path`` attribute is "direct" or "zarr"), so a zarr release that changes the layout shows
up as a warning rather than as a silent slowdown.

Usage (inside :class:`pipeline.cache.store.FeatureStore`)::

    reader = ShardReader.for_array(path / "tokens", codecs, images_per_shard, views, 5, chunk_bytes)
    if reader is None or not reader.read(shard, n, out):
        ...  # read through zarr; reader.last_path == "zarr", reader.last_reason says why
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import google_crc32c  # zarr's own dependency (its crc32c codec)
import numpy as np

if TYPE_CHECKING:
    from pipeline.cache.names import Location

log = logging.getLogger(__name__)

INDEX_ENTRY = 16  # (offset, nbytes) as two little-endian uint64
CHECKSUM = 4  # crc32c of the index, little-endian uint32
EXPECTED_CODECS = {
    "name": "sharding_indexed",
    "inner": [{"name": "bytes", "configuration": {"endian": "little"}}],
    "index": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
    "index_location": "end",
}
EXPECTED_KEYS = {"name": "default", "separator": "/"}  # chunk key encoding: <array>/c/<i>/<j>/...
ReadPath = Literal["direct", "zarr"]


class ShardReader:
    """Reads the images of a shard straight from its file, through the shard index.

    ``last_path`` is how the latest :meth:`read` went: "direct", or "zarr" when it returned False
    (the caller then reads through zarr), with ``last_reason`` saying why; None before any read.
    """

    def __init__(self, array_dir: Location, images_per_shard: int, views: int, ndim: int, chunk_bytes: int):
        self.array_dir, self.images_per_shard, self.views = array_dir, images_per_shard, views
        self.ndim, self.chunk_bytes = ndim, chunk_bytes
        self.last_path: ReadPath | None = None
        self.last_reason: str | None = None
        self._warned = False  # one warning per reader; later fallbacks are logged at debug level

    @classmethod
    def for_array(
        cls, array_dir: Location, codecs: list[dict[str, Any]], images_per_shard: int, views: int, ndim: int, chunk_bytes: int
    ) -> ShardReader | None:
        """A reader when the array at ``array_dir`` has the uncompressed layout of cache_layout.md,
        both in ``codecs`` (its codecs as zarr reports them, a list of dicts) and in its ``zarr.json``;
        else None, after a warning that names the difference (:meth:`layout_problem`)."""
        problem = cls.layout_problem(array_dir, codecs, images_per_shard, views, ndim, chunk_bytes)
        if problem is not None:
            log.warning(
                '%s: %s; every read goes through zarr, several times slower (BENCHMARKS.md, "Streaming")',
                array_dir,
                problem,
                extra={"read_path": "zarr"},
            )
            return None
        return cls(array_dir, images_per_shard, views, ndim, chunk_bytes)

    @staticmethod
    def layout_problem(
        array_dir: Location, codecs: list[dict[str, Any]], images_per_shard: int, views: int, ndim: int, chunk_bytes: int
    ) -> str | None:
        """Why the array at ``array_dir`` cannot be read directly (the first difference from the
        documented layout, in words), or None when it can."""
        if sys.byteorder != "little":
            return "this machine is big-endian; the direct reader copies little-endian bytes as they are"
        problem = _codecs_problem(codecs, None)
        if problem is not None:
            return f"zarr reports {problem}"
        try:
            meta = json.loads((array_dir / "zarr.json").read_text())
            return _metadata_problem(meta, images_per_shard, views, ndim, chunk_bytes)
        except (OSError, ValueError) as e:
            return f"its zarr.json cannot be read ({e})"
        except (TypeError, AttributeError, KeyError, IndexError) as e:
            return f"its zarr.json is not the zarr v3 array metadata expected ({type(e).__name__}: {e})"

    def prefetch(self, shard: int, n: int) -> None:
        """Nothing on local disk (the kernel reads ahead); :class:`pipeline.cache.remote.RemoteShardReader`
        fetches the next shard of a store on object storage here."""

    def shard_file(self, shard: int) -> Location:
        """``<array>/c/<shard>/0/0/...`` (default chunk key encoding, one shard along every other axis)."""
        return self.array_dir.joinpath("c", str(shard), *["0"] * (self.ndim - 1))

    def read(self, shard: int, n: int, out: np.ndarray, per_read: int = 8, rows: np.ndarray | None = None) -> bool:
        """Fill ``out`` ((n, V, h, w, C) float16, C-contiguous) with the shard's first n images, image
        i at row ``rows[i]`` (default: row i), so a shuffled copy costs nothing extra.

        zarr lays the chunks of a shard out in its own order (not image by image), so the chunks are
        read in file order, each run of adjacent chunks (up to ``per_read`` images' worth) with one
        ``preadv`` scattering into the chunks' places in ``out``. Returns False, having read nothing
        usable, when the shard cannot be read directly; ``last_path``/``last_reason`` and a log record
        (attribute ``read_path``) say which it was."""
        return self._record(shard, self._read(shard, n, out, per_read, rows))

    def _record(self, shard: int, reason: str | None) -> bool:
        """Note how a read of ``shard`` went (``reason``: why it could not be direct, or None) in
        ``last_path``/``last_reason`` and the log; True when it was direct."""
        self.last_path, self.last_reason = ("direct", None) if reason is None else ("zarr", reason)
        if reason is None:
            log.debug("%s: shard %d read directly", self.array_dir, shard, extra={"read_path": "direct"})
            return True
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "%s: shard %d: %s; reading it through zarr", self.array_dir, shard, reason, extra={"read_path": "zarr"})
        return False

    def _read(self, shard: int, n: int, out: np.ndarray, per_read: int, rows: np.ndarray | None) -> str | None:
        """:meth:`read`; returns why the shard could not be read directly, or None when it was."""
        if out.dtype != np.float16 or not out.flags.c_contiguous or out.nbytes != n * self.views * self.chunk_bytes:
            return f"out is {out.dtype}{out.shape}, not a C-contiguous float16 block of {n} images"
        try:
            fd = os.open(str(self.shard_file(shard)), os.O_RDONLY)
        except OSError as e:
            return f"no shard file ({e.strerror})"
        try:
            offsets = self._offsets(fd, n)
            if isinstance(offsets, str):
                return offsets
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
                    return "short read"
                i = j
            return None
        finally:
            os.close(fd)

    def _offsets(self, fd: int, n: int) -> np.ndarray | str:
        """(n * V,) byte offsets of the first n images' chunks, from the shard index; or, in words, why
        not: the index is damaged, or a chunk is missing or not a whole uncompressed chunk."""
        entries = self.images_per_shard * self.views
        size = os.fstat(fd).st_size
        index_size = entries * INDEX_ENTRY + CHECKSUM
        if size < index_size:
            return f"shard file of {size} bytes is shorter than its index ({index_size} bytes)"
        raw = os.pread(fd, index_size, size - index_size)
        return parse_index(raw, entries, n * self.views, self.chunk_bytes, size - index_size)


def parse_index(raw: bytes, entries: int, count: int, chunk_bytes: int, data_end: int | None) -> np.ndarray | str:
    """(count,) byte offsets of the first ``count`` chunks from a shard index (``raw``: ``entries``
    (offset, nbytes) pairs and the crc32c); or, in words, why not: the index is damaged, or a chunk is
    missing or not ``chunk_bytes`` uncompressed bytes ending by ``data_end`` (unchecked when None)."""
    if len(raw) != entries * INDEX_ENTRY + CHECKSUM:
        return f"shard index of {len(raw)} bytes, expected {entries * INDEX_ENTRY + CHECKSUM}"
    if google_crc32c.value(raw[:-CHECKSUM]) != int.from_bytes(raw[-CHECKSUM:], "little"):
        return "shard index checksum mismatch"
    index = np.frombuffer(raw[:-CHECKSUM], dtype="<u8").reshape(entries, 2)[:count]
    offsets, lengths = index[:, 0].astype(np.int64), index[:, 1]
    end = np.iinfo(np.int64).max if data_end is None else data_end
    if (lengths != chunk_bytes).any() or (index[:, 0] > end - chunk_bytes).any():
        return f"a chunk is missing or is not {chunk_bytes} uncompressed bytes"  # missing: 2**64 - 1
    return offsets


def _metadata_problem(meta: dict[str, Any], images_per_shard: int, views: int, ndim: int, chunk_bytes: int) -> str | None:
    """The first difference, in words, between an array's zarr.json and the layout read directly."""
    shape = list(meta["shape"])
    if (meta.get("zarr_format"), meta.get("node_type")) != (3, "array") or len(shape) != ndim:
        return f"zarr.json: not a zarr v3 array of {ndim} dimensions"
    if meta.get("data_type") != "float16":
        return f"data type: {meta.get('data_type')!r}, expected 'float16'"
    if 2 * math.prod(shape[2:]) != chunk_bytes:
        return f"image view shape: {shape[2:]}, expected {chunk_bytes} bytes of float16"
    if meta.get("storage_transformers"):
        return f"storage transformers: {meta['storage_transformers']!r}, expected none"
    keys = meta.get("chunk_key_encoding", {})
    keys = {"name": keys.get("name"), "separator": keys.get("configuration", {}).get("separator", "/")}
    if keys != EXPECTED_KEYS:
        return f"chunk key encoding: {keys}, expected {EXPECTED_KEYS}"
    grid = _plain(meta.get("chunk_grid"))
    want = {"name": "regular", "configuration": {"chunk_shape": [images_per_shard, views, *shape[2:]]}}
    if grid != want:
        return f"shard shape (chunk grid): {grid}, expected {want}"
    return _codecs_problem(meta.get("codecs"), [1, 1, *shape[2:]])


def _codecs_problem(codecs: Any, chunk_shape: list[int] | None) -> str | None:
    """The difference, in words, between ``codecs`` and one ``sharding_indexed`` codec holding
    uncompressed little-endian chunks of ``chunk_shape`` (not checked when None), index at the end."""
    codecs = _plain(codecs)
    if not isinstance(codecs, list) or len(codecs) != 1 or codecs[0].get("name") != EXPECTED_CODECS["name"]:
        return f"codecs: {codecs}, expected one {EXPECTED_CODECS['name']!r}"
    conf = codecs[0].get("configuration", {})
    found = {
        "inner": ("chunk codecs", conf.get("codecs")),
        "index": ("shard index codecs", conf.get("index_codecs")),
        "index_location": ("shard index location", conf.get("index_location", "end")),  # the spec's default
    }
    for key, (what, value) in found.items():
        if value != EXPECTED_CODECS[key]:
            return f"{what}: {value}, expected {EXPECTED_CODECS[key]}"
    if chunk_shape is not None and conf.get("chunk_shape") != chunk_shape:
        return f"chunk shape (inside a shard): {conf.get('chunk_shape')}, expected {chunk_shape}"
    return None


def _plain(value: Any) -> Any:
    """A JSON-like value with mappings as dicts and tuples as lists (zarr gives tuples), for comparison."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
