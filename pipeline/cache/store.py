"""The feature store: cached backbone tokens in a zarr v3 group. The only module that imports zarr.

A store holds, for N images and V views (e.g. original and horizontally flipped canvas), the
(h, w, C) float16 token grid of every image, its CLS token, its canvas geometry and a status byte.
cache_layout.md is the on-disk contract. Tokens are uncompressed, one chunk per image view, many
images per shard; a shard is written whole by one writer and then marked done, so several processes
may fill disjoint shards of one store at the same time. ``path`` may be a URL on object storage
(``s3://bucket/cache/m/train.zarr``, :mod:`pipeline.cache.remote`). Usage::

    store = FeatureStore.create(path, ids=ids, views=["original"], grid=(32, 32), channels=1024, attrs=attrs)
    for shard in store.missing_shards():
        store.write_shard(shard, tokens, cls, geometry, status)   # (n, V, 32, 32, 1024) float16, ...
    for indices, tokens in FeatureStore.open(path).iter_shards(shuffle_seed=0):
        ...                                                       # tokens is a reused buffer
    xarray.open_zarr(path, consolidated=False)                    # a Dataset, image ids as coordinate
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
from zarr.buffer.cpu import NDBuffer

from pipeline import __version__
from pipeline.cache.geometry import GEOMETRY_COLUMNS, PATCH, Geometry
from pipeline.cache.names import ImageStatus, Location, StoreIdentity, StorePath, label_set_paths, location
from pipeline.cache.remote import RemoteShardReader, keys_under, nbytes_under, remove_under, upload
from pipeline.cache.schema import (
    DIMENSION_NAMES,
    NODES,
    SCHEMA_VERSION,
    default_images_per_shard,
    group_attrs,
)
from pipeline.cache.shardread import ShardReader
from pipeline.errors import StoreError, store_io

if TYPE_CHECKING:
    from upath import UPath

log = logging.getLogger(__name__)

# Runtime settings, not stored in the metadata, so they are applied on every open: an all-zero image
# (a failed decode) is still written, and no chunk pays an emptiness check.
_ARRAY_CONFIG: Any = {"write_empty_chunks": True}  # zarr's ArrayConfigParams; its type lives in private zarr.core
_INFO_KEYS = ("weights_sha256", "weights_source", "normalization", "ssvt_schema", "ssvt_version", "created")


def _create_arrays(group: zarr.Group, ids: Sequence[str], views: Sequence[str], image_shape: tuple[int, ...], shard: int) -> None:
    """Create every array of a new store: the data arrays as metadata only (no chunk is written), and
    the coordinate arrays ``image``, ``view`` and ``geometry_field`` whole (one small chunk each)."""

    n, v, c = len(ids), image_shape[0], image_shape[-1]
    common: dict[str, Any] = {"compressors": None, "fill_value": 0, "config": _ARRAY_CONFIG}

    def array(name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], **kw: Any) -> zarr.Array:
        return group.create_array(
            name, shape=shape, dtype=dtype, chunks=chunks, dimension_names=DIMENSION_NAMES[name], **common, **kw
        )

    array("tokens", (n, *image_shape), "float16", (1, 1, *image_shape[1:]), shards=(shard, *image_shape))
    array("cls", (n, v, c), "float16", (shard, v, c))
    array("geometry", (n, 6), "int32", (shard, 6)).attrs["columns"] = list(GEOMETRY_COLUMNS)
    array("status", (n,), "uint8", (shard,)).attrs["codes"] = {str(int(code)): code.text for code in ImageStatus}
    array("shard_done", (-(-n // shard),), "uint8", (1,))
    # "string" is zarr v3's variable-length UTF-8 type (vlen-utf8 codec); fixed-width "<U" has no v3 spec.
    for name, values in {"image": ids, "view": views, "geometry_field": GEOMETRY_COLUMNS}.items():
        coord = group.create_array(
            name, shape=(len(values),), dtype="str", chunks=(len(values),), dimension_names=(name,),
            compressors=None, config=_ARRAY_CONFIG,
        )  # fmt: skip
        coord[:] = np.array(list(values), dtype=object)


def _zarr_store(path: Location, *, read_only: bool) -> Any:
    """What zarr opens for ``path``: the local folder as a string (zarr's ``LocalStore``), or an
    ``FsspecStore`` on the URL's filesystem."""
    if isinstance(path, Path):
        return str(path)
    return zarr.storage.FsspecStore.from_url(str(path), read_only=read_only)


def _skeleton(
    meta: dict[str, Any], ids: Sequence[str], views: Sequence[str], image_shape: tuple[int, ...], shard: int
) -> dict[str, bytes]:
    """Every object of a new store (key -> bytes), built in memory: what :meth:`FeatureStore.create`
    uploads to object storage, where there is no folder to build it in and rename."""
    objects: dict[str, Any] = {}
    group = zarr.open_group(zarr.storage.MemoryStore(objects), mode="w-", zarr_format=3, attributes=meta)
    _create_arrays(group, ids, views, image_shape, shard)
    return {key: buf.to_bytes() for key, buf in objects.items()}


def _only_store_objects(keys: Sequence[str]) -> bool:
    """True when every key lies in a store array or is the group's zarr.json: what a killed creation or
    removal leaves, and nothing a user keeps there."""
    return all(key.split("/", 1)[0] in NODES for key in keys)


class FeatureStore:
    """An open feature store. Build one with :meth:`create` or :meth:`open`, not the constructor.

    Attributes: ``path``, ``attrs`` (the group attributes without ``ids``/``sources``), ``ids``,
    ``sources`` (or None), ``n_images``, ``views``, ``n_views``, ``grid`` (h, w), ``channels``,
    ``images_per_shard``, ``n_shards``, ``size``, ``patch`` (canvas pixels per token side: the
    attribute, or 14 in stores written before it), ``layers``, ``backbone``, ``mode``.
    """

    def __init__(self, path: Location, group: zarr.Group, mode: Literal["r", "r+"]) -> None:
        meta: dict[str, Any] = dict(group.attrs)
        self.path, self.mode = path, mode
        self.ids: list[str] = list(meta.pop("ids"))
        self.sources: list[str] | None = meta.pop("sources", None)
        self.attrs: dict[str, Any] = meta
        self.n_images = len(self.ids)
        self.views: list[str] = list(meta["views"])
        self.n_views = len(self.views)
        self.grid: tuple[int, int] = (int(meta["grid"][0]), int(meta["grid"][1]))
        self.channels = int(meta["channels"])
        self.images_per_shard = int(meta["images_per_shard"])
        self.n_shards = -(-self.n_images // self.images_per_shard)
        self.size = int(meta["size"])
        self.patch = int(meta.get("patch", PATCH))  # absent in stores written before it: all DINOv2, 14
        if self.grid != (self.size // self.patch,) * 2 or self.size % self.patch:
            raise ValueError(f"grid {list(self.grid)} is not size {self.size} / patch {self.patch}")
        self.layers: list[int] = list(meta["layers"])
        self.backbone: str = meta["backbone"]
        self._image_shape = (self.n_views, *self.grid, self.channels)
        expected = {
            "tokens": (self.n_images, *self._image_shape),
            "cls": (self.n_images, self.n_views, self.channels),
            "geometry": (self.n_images, 6),
            "status": (self.n_images,),
            "shard_done": (self.n_shards,),
        }
        self._arrays: dict[str, Any] = {}
        for name, shape in expected.items():
            arr = group.get(name)
            if not isinstance(arr, zarr.Array) or arr.shape != shape:
                found = getattr(arr, "shape", "nothing")
                raise StoreError(
                    f"{path} is damaged: array {name!r} should be {shape}, found {found}; "
                    "remove it and extract again (--overwrite)"
                )
            self._arrays[name] = arr.with_config(_ARRAY_CONFIG)
        chunk_bytes = self.grid[0] * self.grid[1] * self.channels * 2
        codecs = list(self._arrays["tokens"].metadata.to_dict()["codecs"])
        reader = ShardReader if isinstance(path, Path) else RemoteShardReader  # pread locally, ranged GETs remotely
        self._direct = reader.for_array(path / "tokens", codecs, self.images_per_shard, self.n_views, 5, chunk_bytes)
        self._shard_buf: np.ndarray | None = None  # reused by iter_shards across epochs

    # -- creating and opening ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: StorePath,
        *,
        ids: Sequence[str],
        views: Sequence[str],
        grid: tuple[int, int],
        channels: int,
        attrs: dict[str, Any],
        images_per_shard: int | None = None,
        sources: Sequence[str] | None = None,
    ) -> FeatureStore:
        """Create an empty store (all metadata, no data) and return it open for writing ("r+").

        The metadata is built in a temporary folder and renamed into place, so a path either holds a
        whole store or nothing. On object storage, which cannot rename, it is built in memory and uploaded
        with the group's ``zarr.json`` last, so a store whose ``zarr.json`` exists is whole. An existing
        path is refused: the caller removes it (--overwrite).
        """
        path = location(path)
        if not isinstance(path, Path):
            return cls._create_remote(path, ids, views, grid, channels, attrs, images_per_shard, sources)
        if path.exists() or path.is_symlink():
            raise StoreError(f"{path} already exists: pass --overwrite to replace it, or choose another --out")
        per_shard = images_per_shard or default_images_per_shard(grid, channels, len(views))
        if per_shard < 1:
            raise StoreError(f"images_per_shard must be positive, got {per_shard}")
        per_shard = min(per_shard, max(1, len(ids)))
        meta = group_attrs(ids, views, grid, channels, attrs, per_shard, sources)
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
        try:
            with store_io(f"creating {path}"):
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                group = zarr.open_group(str(tmp), mode="w-", zarr_format=3, attributes=meta)
                _create_arrays(group, ids, views, (len(views), *grid, channels), per_shard)
                os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("created %s: %d images, %d per shard", path, len(ids), per_shard)
        return cls.open(path, mode="r+")

    @classmethod
    def _create_remote(
        cls, path: UPath, ids: Sequence[str], views: Sequence[str], grid: tuple[int, int], channels: int,
        attrs: dict[str, Any], images_per_shard: int | None, sources: Sequence[str] | None,
    ) -> FeatureStore:  # fmt: skip
        """:meth:`create` on object storage: upload the arrays' objects, then the group's zarr.json.

        Several processes may create the same store at once (parts of a job array): each uploads the
        same objects, so whichever finishes last leaves the same store (only ``created`` differs), and
        nothing another creator uploaded is deleted. Shard objects without a group zarr.json can only
        be what a killed :meth:`remove` left, and are deleted first; a store that appeared meanwhile
        (shards are written only after its zarr.json) is refused like any existing store."""
        exists = StoreError(f"{path} already exists: pass --overwrite to replace it, or choose another --out")
        if FeatureStore.exists(path):
            raise exists
        per_shard = images_per_shard or default_images_per_shard(grid, channels, len(views))
        if per_shard < 1:
            raise StoreError(f"images_per_shard must be positive, got {per_shard}")
        per_shard = min(per_shard, max(1, len(ids)))
        meta = group_attrs(ids, views, grid, channels, attrs, per_shard, sources)
        objects = _skeleton(meta, ids, views, (len(views), *grid, channels), per_shard)
        with store_io(f"creating {path}"):
            if leftover := keys_under(path):
                if not _only_store_objects(leftover):
                    raise StoreError(f"{path} holds other objects (e.g. {leftover[0]}): choose another --out")
                if FeatureStore.exists(path):  # created by another process since the check above
                    raise exists
                if any(key not in objects for key in leftover):
                    log.info("%s: removing what a killed removal left (%d objects)", path, len(leftover))
                    remove_under(path)
                # else: the metadata of a killed creation, or of one running now, rewritten alike below
            group_meta = objects.pop("zarr.json")
            upload(path, objects)
            upload(path, {"zarr.json": group_meta})
        log.info("created %s: %d images, %d per shard", path, len(ids), per_shard)
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path: StorePath, mode: Literal["r", "r+"] = "r") -> FeatureStore:
        """Open an existing store for reading ("r") or for writing shards ("r+")."""
        path = location(path)
        if mode not in ("r", "r+"):
            raise StoreError(f"mode must be 'r' or 'r+', got {mode!r}")
        if not path.exists():
            raise StoreError(f"no feature store at {path}: run `ssvt extract` to create it")
        try:
            group = zarr.open_group(_zarr_store(path, read_only=mode == "r"), mode=mode, zarr_format=3)
            schema = group.attrs.get("ssvt_schema")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{path} is not an ssvt feature store ({type(e).__name__}: {e})") from e
        if not isinstance(schema, int):
            raise StoreError(f"{path} is a zarr group but not an ssvt feature store (no 'ssvt_schema' attribute)")
        if schema > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema {schema} but this ssvt ({__version__}) reads up to {SCHEMA_VERSION}: "
                "upgrade ssvt, or extract again with this version"
            )
        try:
            return cls(path, group, mode)
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:
            raise StoreError(f"{path} has damaged metadata ({e}); remove it and extract again (--overwrite)") from e

    @staticmethod
    def exists(path: StorePath) -> bool:
        """True if ``path`` holds a zarr group (complete or not); see :meth:`is_complete`."""
        return (location(path) / "zarr.json").is_file()

    @staticmethod
    def remove(path: StorePath) -> None:
        """Delete a store (used by --overwrite). Refuses anything but a zarr group or an empty folder (on
        object storage: anything but the objects of a store)."""
        path = location(path)
        if not isinstance(path, Path):
            FeatureStore._remove_remote(path)
            return
        if not path.exists():
            return
        if not FeatureStore.exists(path) and not (path.is_dir() and not any(path.iterdir())):
            raise StoreError(f"refusing to delete {path}: it is not a feature store (no zarr.json); remove it by hand")
        with store_io(f"removing {path}"):
            shutil.rmtree(path)
        log.info("removed %s", path)

    @staticmethod
    def _remove_remote(path: UPath) -> None:
        """:meth:`remove` on object storage: the group's zarr.json first, so that a removal cut short leaves
        no store that looks whole, then everything else."""
        with store_io(f"removing {path}"):
            keys = keys_under(path)
            if not keys:
                return
            if not _only_store_objects(keys):
                raise StoreError(f"refusing to delete {path}: it holds objects that are not a feature store's (e.g. {keys[0]})")
            (path / "zarr.json").unlink(missing_ok=True)
            remove_under(path)
        log.info("removed %s", path)

    # -- shards -----------------------------------------------------------------------------------

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Image indices [start, stop) of ``shard``; the last shard may hold fewer images."""
        if not 0 <= shard < self.n_shards:
            raise StoreError(f"shard {shard} out of range: {self.path} has {self.n_shards} shards")
        start = shard * self.images_per_shard
        return start, min(start + self.images_per_shard, self.n_images)

    def shard_of(self, index: int) -> int:
        if not 0 <= index < self.n_images:
            raise StoreError(f"image {index} out of range: {self.path} has {self.n_images} images")
        return index // self.images_per_shard

    def done_shards(self) -> np.ndarray:
        """(n_shards,) bool, True where a shard was written completely (read fresh from disk)."""
        return np.asarray(self._arrays["shard_done"][:]) == 1

    def missing_shards(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(~self.done_shards())]

    def is_complete(self) -> bool:
        return bool(self.done_shards().all())

    def write_shard(self, shard: int, tokens: np.ndarray, cls: np.ndarray, geometry: np.ndarray, status: np.ndarray) -> None:
        """Write every array of one whole shard, then mark it done.

        tokens: (n, V, h, w, C) float16; cls: (n, V, C) float16; geometry: (n, 6) int32 in
        GEOMETRY_COLUMNS order; status: (n,) uint8, 1 = ok, 2 = failed (features zero); n = the
        shard's image count. A crash before the mark leaves the shard missing, to be rewritten whole.
        """
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only; open it with mode='r+' to write shards")
        start, stop = self.shard_range(shard)
        n, v, c = stop - start, self.n_views, self.channels
        parts = {
            "tokens": (tokens, (n, *self._image_shape), np.float16),
            "cls": (cls, (n, v, c), np.float16),
            "geometry": (geometry, (n, 6), np.int32),
            "status": (status, (n,), np.uint8),
        }
        for name, (arr, shape, dtype) in parts.items():
            if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != dtype:
                found = f"{arr.dtype}{arr.shape}" if isinstance(arr, np.ndarray) else f"a {type(arr).__name__}"
                raise StoreError(f"shard {shard}: {name} is {found}, expected {np.dtype(dtype)}{shape}")
        bad = ~np.isin(status, (ImageStatus.OK, ImageStatus.FAILED))
        if bad.any():
            raise StoreError(f"shard {shard}: status must be 1 (ok) or 2 (failed), got {status[bad][0]}")
        failed = status == ImageStatus.FAILED
        if tokens[failed].any() or cls[failed].any():
            raise StoreError(f"shard {shard}: images with status 2 (failed) must have all-zero tokens and cls")
        with store_io(f"writing shard {shard} of {self.path}"):
            for name, (arr, _, _) in parts.items():
                self._arrays[name][start:stop] = np.ascontiguousarray(arr)
            self._arrays["shard_done"][shard : shard + 1] = np.ones(1, np.uint8)
        log.debug("wrote shard %d (%d images) of %s", shard, n, self.path)

    # -- reading ----------------------------------------------------------------------------------

    def read_tokens(self, start: int, stop: int, view: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens of images [start, stop): (n, V, h, w, C) float16, or (n, h, w, C) for one view.

        ``out``, if given, must be a C-contiguous float16 array of exactly that shape; it is filled
        and returned. Read a few images per call: large single reads are slow (page faults).
        """
        if not 0 <= start <= stop <= self.n_images:
            raise StoreError(f"image range [{start}, {stop}) out of bounds for {self.n_images} images")
        if view is not None and not 0 <= view < self.n_views:
            raise StoreError(f"view {view} out of range: the store has views {self.views}")
        shape = (stop - start, *self._image_shape) if view is None else (stop - start, *self._image_shape[1:])
        if out is None:
            out = np.empty(shape, dtype=np.float16)
        elif out.shape != shape or out.dtype != np.float16 or not out.flags.c_contiguous:
            raise StoreError(f"out must be a C-contiguous float16 array of shape {shape}, got {out.dtype}{out.shape}")
        if isinstance(self._direct, RemoteShardReader) and self._read_remote(self._direct, start, stop, view, out):
            return out
        selection = (slice(start, stop),) if view is None else (slice(start, stop), view)
        with store_io(f"reading {self.path}"):
            self._arrays["tokens"].get_basic_selection(selection, out=NDBuffer.from_numpy_array(out))
        return out

    def _read_remote(self, reader: RemoteShardReader, start: int, stop: int, view: int | None, out: np.ndarray) -> bool:
        """:meth:`read_tokens` on object storage: each shard's images with ranged GETs of their chunks
        (:meth:`RemoteShardReader.read_images`), several times faster than zarr there. False when a shard
        cannot be read that way; the caller then reads the whole range through zarr."""
        at = start
        while at < stop:
            first, last = self.shard_range(self.shard_of(at))
            upto = min(stop, last)
            if not reader.read_images(self.shard_of(at), last - first, at - first, out[at - start : upto - start], view):
                return False
            at = upto
        return True

    def read_cls(self) -> np.ndarray:
        """(N, V, C) float16 CLS tokens."""
        return np.asarray(self._arrays["cls"][:])

    def geometry(self) -> np.ndarray:
        """(N, 6) int32, columns GEOMETRY_COLUMNS."""
        return np.asarray(self._arrays["geometry"][:])

    def geometries(self) -> list[Geometry]:
        return [Geometry.from_row(row, canvas=self.size) for row in self.geometry()]

    def status(self) -> np.ndarray:
        """(N,) uint8: 0 = not written, 1 = ok, 2 = failed to decode (features zero)."""
        return np.asarray(self._arrays["status"][:])

    def iter_shards(self, shuffle_seed: int | None = None, images_per_read: int = 8) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices (n,), tokens (n, V, h, w, C) float16)`` once per shard, covering every image.

        With a seed, shard order and image order within each shard are shuffled (reproducibly). The
        store must be complete. ``tokens`` is a view of ONE buffer reused for every shard: use or copy
        it before asking for the next shard. Failed images (status 2) are included, as zeros.
        """
        if images_per_read < 1:
            raise StoreError(f"images_per_read must be positive, got {images_per_read}")
        missing = self.missing_shards()
        if missing:
            raise StoreError(
                f"{self.path} is incomplete: {len(missing)} of {self.n_shards} shards not written "
                f"(first: {missing[0]}); run `ssvt extract` again to resume"
            )
        rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
        order = np.arange(self.n_shards) if rng is None else rng.permutation(self.n_shards)
        if self._shard_buf is None:  # reused across calls: a fresh 100+ MB buffer costs page faults
            self._shard_buf = np.empty((min(self.images_per_shard, self.n_images), *self._image_shape), np.float16)
        buf = self._shard_buf
        for i, shard in enumerate(order):
            start, stop = self.shard_range(int(shard))
            n = stop - start
            perm = np.arange(n) if rng is None else rng.permutation(n)  # position j holds local image perm[j]
            where = np.empty(n, dtype=np.intp)
            where[perm] = np.arange(n)
            self._read_shard(int(shard), start, buf[:n], where, images_per_read)
            if self._direct is not None and i + 1 < len(order):  # object storage: fetch the next shard while this one is used
                after = self.shard_range(int(order[i + 1]))
                self._direct.prefetch(int(order[i + 1]), after[1] - after[0])
            yield start + perm, buf[:n]

    def _read_shard(self, shard: int, start: int, out: np.ndarray, where: np.ndarray, images_per_read: int) -> None:
        """The images of one shard into ``out``, local image i at row ``where[i]``: straight from the
        shard file when it has the documented uncompressed layout (pipeline.cache.shardread), else through
        zarr a few contiguous images per call, scattered into place."""
        n = len(out)
        if self._direct is not None and self._direct.read(shard, n, out, images_per_read, rows=where):
            return
        block = np.empty((images_per_read, *self._image_shape), np.float16)
        for a in range(0, n, images_per_read):
            b = min(n, a + images_per_read)
            self.read_tokens(start + a, start + b, out=block[: b - a])
            out[where[a:b]] = block[: b - a]

    # -- description ------------------------------------------------------------------------------

    def nbytes_on_disk(self) -> int:
        """Bytes of every file under the store folder (data and metadata); on object storage, of every
        object under the store's prefix (one listing)."""
        if not isinstance(self.path, Path):
            return nbytes_under(self.path)
        return sum((Path(root) / name).stat().st_size for root, _, files in os.walk(self.path) for name in files)

    def raw_token_bytes(self) -> int:
        """N * V * h * w * C * 2: the float16 token bytes alone."""
        return self.n_images * int(np.prod(self._image_shape)) * 2

    def label_sets(self) -> list[dict[str, str]]:
        """Label sets imported for this store (:func:`pipeline.cache.names.label_set_path`)."""
        return [{"name": name, "path": str(path)} for name, path in label_set_paths(self.path).items()]

    def info(self) -> dict[str, Any]:
        """A summary for `ssvt info`: model, grid, counts, completeness and sizes."""
        status = self.status()
        done = self.done_shards()
        on_disk, raw = self.nbytes_on_disk(), self.raw_token_bytes()
        return {
            "path": str(self.path), "backbone": self.backbone, "layers": self.layers, "size": self.size, "patch": self.patch,
            "grid": list(self.grid), "channels": self.channels, "views": self.views, "n_images": self.n_images,
            "ok": int((status == ImageStatus.OK).sum()), "failed": int((status == ImageStatus.FAILED).sum()),
            "not_written": int((status == ImageStatus.MISSING).sum()),
            "done_shards": int(done.sum()), "n_shards": self.n_shards, "complete": bool(done.all()),
            "images_per_shard": self.images_per_shard,
            "shard_bytes": self.images_per_shard * int(np.prod(self._image_shape)) * 2,
            "bytes_on_disk": on_disk, "raw_token_bytes": raw, "overhead": on_disk / raw - 1.0,
            **{key: self.attrs.get(key) for key in _INFO_KEYS},
            "fingerprint": self.fingerprint(), "label_sets": self.label_sets(),
        }  # fmt: skip

    @property
    def identity(self) -> StoreIdentity:
        """What the tokens are: backbone, weights, layers, size, grid, channels and views."""
        return StoreIdentity.from_attrs({**self.attrs, "views": self.views, "grid": self.grid, "channels": self.channels})

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the store's identity and its image ids (:meth:`StoreIdentity.fingerprint`)."""
        return self.identity.fingerprint(self.ids)
