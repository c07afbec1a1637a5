"""Stores and label sets on object storage: the I/O that differs from local disk.

A location (:func:`pipeline.cache.names.location`) is a local ``Path`` or, for a URL such as
``s3://bucket/cache/m-448-last/train.zarr``, a :class:`upath.UPath` on an fsspec filesystem (s3fs for
S3 and S3-compatible servers; cache_layout.md, "Stores on object storage", says why fsspec). Zarr reads
and writes a remote store through its ``FsspecStore``; the tokens are read by
:class:`RemoteShardReader`, the object-storage twin of :class:`pipeline.cache.shardread.ShardReader`.
Credentials and the endpoint come from the environment and the config files that botocore reads
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws/credentials``,
``~/.aws/config``); nothing here writes them anywhere. Usage::

    with replaced_whole(label_path) as tmp:     # a local file; uploaded (or renamed) whole on success
        h5py.File(tmp, "w")...
    with readable(label_path) as f:             # a local path, or a file object on object storage
        h5py.File(f, "r")...
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import numpy as np

from pipeline.cache.names import Location
from pipeline.cache.shardread import CHECKSUM, INDEX_ENTRY, ShardReader, parse_index

if TYPE_CHECKING:
    from upath import UPath

log = logging.getLogger(__name__)

PART_BYTES = 16 * 2**20  # one ranged GET: large enough to amortise a request, small enough to keep several in flight
READ_BLOCK = 8 * 2**20  # read-ahead of a label set's file object (h5py makes many small reads)


def keys_under(path: UPath) -> list[str]:
    """Every object under ``path``, as keys relative to it (``zarr.json``, ``tokens/c/0/0/0/0/0``), sorted."""
    root = path.path.rstrip("/")
    return sorted(key[len(root) + 1 :] for key in path.fs.find(root))


def nbytes_under(path: UPath) -> int:
    """Bytes of every object under ``path`` (one listing)."""
    return int(path.fs.du(path.path.rstrip("/"), total=True))


def remove_under(path: UPath) -> None:
    """Delete every object under ``path`` (batched deletes)."""
    path.fs.rm(path.path.rstrip("/"), recursive=True)


def upload(path: UPath, objects: dict[str, bytes]) -> None:
    """Write ``objects`` (key relative to ``path`` -> bytes), each one whole object, several in flight."""
    root = path.path.rstrip("/")
    path.fs.pipe({f"{root}/{key}": data for key, data in objects.items()})


def download(path: UPath, local: Path) -> None:
    """Copy the object at ``path`` into the local file ``local``."""
    path.fs.get_file(path.path, str(local))


#: The packages whose errors are the object-storage client's: credentials, endpoint, permissions.
CLIENT_PACKAGES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google")


def client_error_message(exc: BaseException) -> str | None:
    """One line for an error raised by the object-storage client (no credentials found, endpoint not
    reachable, access denied), saying where ssvt takes those settings from; None for any other error.
    The client's own text never holds the secret key."""
    if type(exc).__module__.split(".")[0] not in CLIENT_PACKAGES:
        return None
    return (
        f"object storage: {type(exc).__name__}: {exc} (credentials and endpoint come from AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or ~/.aws/credentials and ~/.aws/config)"
    )


@contextmanager
def replaced_whole(path: Location) -> Iterator[Path]:
    """A local temporary file to write ``path``'s new content into. When the block ends without an error
    it replaces ``path`` whole: renamed over it on local disk, uploaded in one piece to object storage
    (one PUT, or a multipart upload, which S3 shows only once complete). It is deleted either way, so
    ``path`` holds the old file or the new one, never part of one."""
    if isinstance(path, Path):
        tmp = path.with_name(f"{path.name}.tmp")  # never read; a killed import's leftover is overwritten
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fd, name = tempfile.mkstemp(prefix="ssvt-", suffix=f"-{path.name}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        path.fs.put_file(str(tmp), path.path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def readable(path: Location) -> Iterator[Path | IO[bytes]]:
    """``path`` itself on local disk, else a read-only file object on the object (ranged reads with
    read-ahead), for readers such as ``h5py.File`` that take either."""
    if isinstance(path, Path):
        yield path
        return
    with path.fs.open(path.path, "rb", block_size=READ_BLOCK, cache_type="readahead") as f:
        yield f


class RemoteShardReader(ShardReader):
    """Reads the tokens shards of a store on object storage (same layout checks as :class:`ShardReader`).

    A shard costs one round of ranged GETs of at most ``part_bytes`` each, all in flight together, that
    bring its chunks and its index (at the end) at once; a shard laid out otherwise costs one more, a
    suffix range for the index first (:meth:`_fetch`).
    :meth:`prefetch` fetches the next shard in a background thread while the caller uses this one.
    :meth:`read_images` reads a few images of a shard (``FeatureStore.read_tokens``): the shard's index
    once, kept for later calls (stores are read once complete), then only those images' chunks.
    """

    def __init__(self, array_dir: Any, images_per_shard: int, views: int, ndim: int, chunk_bytes: int) -> None:
        super().__init__(array_dir, images_per_shard, views, ndim, chunk_bytes)
        self.part_bytes = max(chunk_bytes, PART_BYTES // chunk_bytes * chunk_bytes)
        self._pool: ThreadPoolExecutor | None = None  # made on first prefetch, so a reader that never prefetches has no thread
        self._pending: tuple[int, int, Future[Any]] | None = None  # (shard, n, future) of the one prefetch in flight
        self._indexes: dict[int, np.ndarray] = {}  # shard -> chunk offsets, (n * V,) int64

    def prefetch(self, shard: int, n: int) -> None:
        """Start fetching the first ``n`` images of ``shard`` in the background (one shard ahead at most)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ssvt-prefetch")
        if self._pending is not None:  # never asked for (the caller stopped early): drop it
            self._pending[2].cancel()
        self._pending = (shard, n, self._pool.submit(self._fetch, shard, n))

    def _read(self, shard: int, n: int, out: np.ndarray, per_read: int, rows: np.ndarray | None) -> str | None:
        if out.dtype != np.float16 or not out.flags.c_contiguous or out.nbytes != n * self.views * self.chunk_bytes:
            return f"out is {out.dtype}{out.shape}, not a C-contiguous float16 block of {n} images"
        pending, self._pending = self._pending, None
        fetched = pending[2].result() if pending is not None and pending[:2] == (shard, n) else self._fetch(shard, n)
        if isinstance(fetched, str):
            return fetched
        offsets, parts = fetched
        dest = np.arange(n * self.views)  # chunk j = image j // V, view j % V
        if rows is not None:
            dest = (np.asarray(rows)[:, None] * self.views + np.arange(self.views)).ravel()
        self._place(offsets, parts, out.reshape(n * self.views, -1).view(np.uint8), dest)
        return None

    def read_images(self, shard: int, n: int, first: int, out: np.ndarray, view: int | None = None) -> bool:
        """Fill ``out`` with images ``first .. first + len(out)`` of ``shard`` (indices within the shard,
        which holds ``n``): (k, V, h, w, C) float16, or (k, h, w, C) of one ``view``. Returns False,
        having read nothing usable, when the shard cannot be read directly (see :meth:`read`)."""
        views = np.arange(self.views) if view is None else np.array([view])
        entries = ((first + np.arange(len(out)))[:, None] * self.views + views).ravel()
        if out.dtype != np.float16 or not out.flags.c_contiguous or out.nbytes != len(entries) * self.chunk_bytes:
            return self._record(shard, f"out is {out.dtype}{out.shape}, not a C-contiguous float16 block of {len(out)} images")
        key = cast("UPath", self.shard_file(shard))
        offsets = self._indexes.get(shard)
        if offsets is None:
            found = self._index(key.fs, key.path, n)
            if isinstance(found, str):
                return self._record(shard, found)
            offsets = self._indexes[shard] = found
        wanted = offsets[entries]
        starts, ends = self._ranges(np.sort(wanted))
        blobs = self._get(key.fs, key.path, starts, ends)
        if isinstance(blobs, str):
            return self._record(shard, blobs)
        self._place(wanted, list(zip(starts, blobs, strict=True)), out.reshape(len(entries), -1).view(np.uint8),
                    np.arange(len(entries)))  # fmt: skip
        return self._record(shard, None)

    def _place(self, offsets: np.ndarray, parts: list[tuple[int, bytes]], chunks: np.ndarray, dest: np.ndarray) -> None:
        """Copy the chunk at ``offsets[k]`` (inside one of ``parts``: (start, bytes) of a ranged GET) into
        row ``dest[k]`` of ``chunks`` ((rows, chunk_bytes) uint8)."""
        part = np.searchsorted([start for start, _ in parts], offsets, side="right") - 1  # the range holding each chunk
        for k, offset in enumerate(offsets.tolist()):
            start, data = parts[part[k]]
            chunks[dest[k]] = np.frombuffer(data, np.uint8, self.chunk_bytes, offset - start)

    def _fetch(self, shard: int, n: int) -> tuple[np.ndarray, list[tuple[int, bytes]]] | str:
        """(offsets of the n * V chunks, [(start, bytes) of each ranged GET]), or why the shard cannot be
        read this way (the caller then reads it through zarr).

        A shard that zarr wrote whole packs its n * V chunks from byte 0 with the index right after them,
        so the index is fetched together with the data, in one round of ranges. If the object is laid out
        otherwise, what lies there fails the index checksum, and the index is fetched first (a suffix
        range) and the chunks after it, where it says they are."""
        key = cast("UPath", self.shard_file(shard))
        fs, name = key.fs, key.path
        index_size = self.images_per_shard * self.views * INDEX_ENTRY + CHECKSUM
        data = n * self.views * self.chunk_bytes
        starts = list(range(0, data, self.part_bytes))
        ends = [min(start + self.part_bytes, data) for start in starts]
        ends[-1] += index_size
        blobs = self._get(fs, name, starts, ends)
        if not isinstance(blobs, str):
            offsets = self._packed_index(blobs[-1][-index_size:], n)
            if not isinstance(offsets, str):
                self._indexes[shard] = offsets
                return offsets, list(zip(starts, blobs, strict=True))
        elif blobs.startswith("no shard"):
            return blobs
        offsets = self._suffix_index(fs, name, n)
        if isinstance(offsets, str):
            return offsets
        self._indexes[shard] = offsets
        starts, ends = self._ranges(np.sort(offsets))
        blobs = self._get(fs, name, starts, ends)
        if isinstance(blobs, str):
            return blobs
        return offsets, list(zip(starts, blobs, strict=True))

    def _index(self, fs: Any, name: str, n: int) -> np.ndarray | str:
        """The chunk offsets of the shard object ``name`` holding n images: its index read where a packed
        shard has it (right after its n * V chunks), else with a suffix range; or why not."""
        entries, data = self.images_per_shard * self.views, n * self.views * self.chunk_bytes
        raw = self._get(fs, name, [data], [data + entries * INDEX_ENTRY + CHECKSUM])
        if isinstance(raw, str):
            return raw if raw.startswith("no shard") else self._suffix_index(fs, name, n)
        offsets = self._packed_index(raw[0], n)
        return self._suffix_index(fs, name, n) if isinstance(offsets, str) else offsets

    def _packed_index(self, raw: bytes, n: int) -> np.ndarray | str:
        """The offsets in ``raw``, read where a packed shard of n images has its index: valid only if every
        chunk lies whole, aligned, in the n * V chunk slots before it."""
        data = n * self.views * self.chunk_bytes
        offsets = parse_index(raw, self.images_per_shard * self.views, n * self.views, self.chunk_bytes, data)
        if not isinstance(offsets, str) and (offsets % self.chunk_bytes).any():
            return "chunks are not aligned to the chunk size"
        return offsets

    def _suffix_index(self, fs: Any, name: str, n: int) -> np.ndarray | str:
        """The offsets from the index at the end of object ``name`` (one suffix range, no HEAD); or why not."""
        index_size = self.images_per_shard * self.views * INDEX_ENTRY + CHECKSUM
        try:
            raw = fs.cat_file(name, start=-index_size)
        except FileNotFoundError:
            return "no shard object"
        except (OSError, ValueError) as e:
            return f"reading the shard index failed ({type(e).__name__}: {e})"
        return parse_index(raw, self.images_per_shard * self.views, n * self.views, self.chunk_bytes, None)

    @staticmethod
    def _get(fs: Any, name: str, starts: list[int], ends: list[int]) -> list[bytes] | str:
        """The byte ranges [starts, ends) of object ``name``, all requests in flight together; or why not."""
        try:
            blobs = fs.cat_ranges([name] * len(starts), starts, ends, on_error="raise")
        except FileNotFoundError:
            return "no shard object"
        except (OSError, ValueError) as e:  # a range past the end of the object is an error, not a short read
            return f"reading the shard failed ({type(e).__name__}: {e})"
        if any(len(b) != end - start for b, start, end in zip(blobs, starts, ends, strict=True)):
            return "short read: the shard object is shorter than its chunks"
        return list(blobs)

    def _ranges(self, offsets: np.ndarray) -> tuple[list[int], list[int]]:
        """[start), [end) of the ranged GETs covering the chunks at sorted ``offsets``: runs of adjacent
        chunks, cut every ``part_bytes``."""
        starts: list[int] = []
        ends: list[int] = []
        for offset in offsets.tolist():
            if starts and ends[-1] == offset and ends[-1] - starts[-1] < self.part_bytes:
                ends[-1] += self.chunk_bytes
            else:
                starts.append(offset)
                ends.append(offset + self.chunk_bytes)
        return starts, ends
