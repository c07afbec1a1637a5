"""Label sets: a label source imported once, aligned to a feature store, into an HDF5 file beside it.

Usage::

    labels = ensure_labels(workspace.label_source("eps"), store, num_classes=21)
    masks = labels.masks(np.arange(10))          # (10, S, S) uint8 on the store's canvas, 255 = ignore

Each label kind's reader (:mod:`pipeline.cache.label_kinds`) places its labels on the canvas: dense
masks by nearest neighbour, scribbles and points drawn after the geometry transform so no stroke or
click is lost. This is the only module that imports h5py; the file layout is specified in
cache_layout.md ("Label set"). A label set beside a store on object storage is built in a local
temporary file and uploaded whole, and read back through a file object (:mod:`pipeline.cache.remote`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import __version__
from pipeline.cache.geometry import IGNORE
from pipeline.cache.label_kinds import KindReader, LabelSource
from pipeline.cache.names import ImageStatus, Location, label_set_path
from pipeline.cache.remote import download, readable, replaced_whole
from pipeline.cache.store import FeatureStore
from pipeline.errors import LabelError, StoreError, store_io

log = logging.getLogger(__name__)

LABEL_SCHEMA = 1


@dataclass
class LabelSet:
    """An imported label set: a read-only view of its HDF5 file (cache_layout.md, "Label set")."""

    path: Location
    name: str
    kind: str
    sparse: bool
    canvas: int
    labelled: np.ndarray  # (N,) bool: image has at least one labelled pixel
    attrs: dict[str, Any]

    @classmethod
    def open(cls, path: Location) -> LabelSet:
        try:
            with readable(path) as source, h5py.File(source, "r") as f:
                attrs = {k: _decode(v) for k, v in f.attrs.items()}
                labelled = f["pixel_count"][...] > 0
                canvas = int(f["masks"].shape[-1])
        except (OSError, KeyError) as exc:
            raise StoreError(f"{path} is not a readable ssvt label set ({exc}); delete it to re-import") from None
        if attrs.get("ssvt_label_schema", 0) > LABEL_SCHEMA:
            raise StoreError(f"{path} has label schema {attrs['ssvt_label_schema']}, newer than this ssvt; upgrade ssvt")
        return cls(path, attrs["name"], attrs["kind"], bool(attrs["sparse"]), canvas, labelled, attrs)

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["sha256"])

    def masks(self, indices: np.ndarray) -> np.ndarray:
        """(n, S, S) uint8 canvas labels for store indices ``indices`` (any order)."""
        with readable(self.path) as source, h5py.File(source, "r") as f:
            ds = f["masks"]
            return np.stack([ds[int(i)] for i in indices]) if len(indices) else np.empty((0, self.canvas, self.canvas), np.uint8)

    def image_labels(self) -> np.ndarray | None:
        """(N, 20) float32 multi-hot for image-level sets (cls-labels), else None."""
        with readable(self.path) as source, h5py.File(source, "r") as f:
            return f["image_labels"][...] if "image_labels" in f else None


def update_label_attrs(path: Location, **attrs: Any) -> None:
    """Add or replace attributes of an existing label set (e.g. ``quality`` from ``ssvt score-labels``);
    the masks and their fingerprint are untouched. On object storage the file is fetched, changed and
    uploaded whole."""
    if isinstance(path, Path):
        with h5py.File(path, "r+") as f:
            f.attrs.update(attrs)
        return
    with replaced_whole(path) as tmp:
        download(path, tmp)
        with h5py.File(tmp, "r+") as f:
            f.attrs.update(attrs)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith(("[", "{")):
        return json.loads(value)
    return value.item() if isinstance(value, np.generic) else value


def source_fingerprint(source: LabelSource) -> str:
    """SHA-256 over the source's files: names, sizes and modification times (folders) or the bytes
    (single files), so a changed source is noticed without re-reading every mask."""
    h = hashlib.sha256(source.kind.encode())
    if source.mapping:  # only when set, so the fingerprints of existing sets stay the same
        h.update(f"mapping={source.mapping}".encode())
    for path in (source.path, source.background):
        if path is None:
            continue
        if path.is_dir():
            _hash_folder(h, path, "")
        elif path.is_file():
            h.update(path.read_bytes())
        else:
            raise LabelError(f"label source {source.name!r}: {path} does not exist; fix [labels.{source.name}] path in ssvt.toml")
    return h.hexdigest()


def _hash_folder(h: Any, folder: Path, prefix: str) -> None:
    """Names, sizes and mtimes of every file under ``folder`` (split subfolders included), sorted."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            _hash_folder(h, Path(entry.path), f"{prefix}{entry.name}/")
            continue
        st = entry.stat()
        h.update(f"{prefix}{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


def ensure_labels(source: LabelSource, store: FeatureStore, *, num_classes: int, strict: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> LabelSet:  # fmt: skip
    """The label set for ``store``, imported now if missing or if the source or the store changed."""
    path = label_set_path(store.path, source.name)
    fp = source_fingerprint(source)
    if path.exists():
        existing = LabelSet.open(path)
        recorded = tuple(existing.attrs.get(k) for k in ("source_sha256", "store_fingerprint", "num_classes"))
        if recorded == (fp, store.fingerprint(), num_classes):
            missing = existing.attrs["images_without_label"]
            if strict and missing:  # an earlier lenient import must not let --strict pass
                raise LabelError(f"{missing} images have no label in {source.name!r} ({path}); --strict stops here")
            return existing
        log.warning("label source %r, its feature store or the class count changed since import; re-importing", source.name)
    return import_labels(source, store, num_classes=num_classes, strict=strict, progress=progress, source_sha256=fp)


def import_labels(source: LabelSource, store: FeatureStore, *, num_classes: int, strict: bool = False,
                  progress: Callable[[int, int], None] | None = None,
                  source_sha256: str | None = None) -> LabelSet:  # fmt: skip
    """Read every label of ``source`` for the store's images and write the HDF5 label set."""
    reader = source.reader(num_classes)
    geoms = store.geometries()

    def finish(missing: list[str]) -> dict[str, Any]:
        _check_coverage(source, store, missing, reader, strict)
        return {
            "kind": source.kind, "sparse": source.spec.sparse, "source": str(source.path),
            "source_background": str(source.background or ""), "source_sha256": source_sha256 or source_fingerprint(source),
            "points_dropped": reader.dropped,
        }  # fmt: skip

    image_labels = None if reader.image_level is None else _image_level_rows(reader.image_level, store.ids)
    labels = write_label_set(store, source.name, lambda i: reader.canvas(store.ids[i], geoms[i]), num_classes=num_classes,
                             attrs=finish, image_labels=image_labels, progress=progress)  # fmt: skip
    missing = labels.attrs["images_without_label"]
    if missing:
        log.warning("%d of %d images have no label in %r and are left out of training", missing, store.n_images, source.name)
    return labels


def write_label_set(
    store: FeatureStore,
    name: str,
    canvas: Callable[[int], np.ndarray | None],
    *,
    num_classes: int,
    attrs: Callable[[list[str]], dict[str, Any]],
    image_labels: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LabelSet:
    """Write label set ``name`` of ``store``: ``canvas(i)`` gives image i's (S, S) uint8 labels (255 =
    ignore) or None, for every extracted image. ``attrs(missing ids)`` runs after the last image and
    returns the kind and provenance attributes (it may raise to refuse the set); the counts, histogram
    and fingerprints are added here. ``image_labels``: (N, C) class flags for image-level sets.

    Written to a local temporary file that replaces the set whole when complete (renamed, or uploaded
    to object storage), so a crash never leaves half a label set.
    """
    geoms, status, ids, s = store.geometries(), store.status(), store.ids, store.size
    path = label_set_path(store.path, name)
    digest = hashlib.sha256()
    counts = np.zeros(len(ids), dtype=np.int64)
    hist = np.zeros(num_classes, dtype=np.int64)
    missing: list[str] = []
    with store_io(f"writing label set {name!r} into {path}"), replaced_whole(path) as tmp, h5py.File(tmp, "w") as f:
        masks = f.create_dataset("masks", (len(ids), s, s), dtype=np.uint8, chunks=(1, s, s), compression="lzf", fillvalue=IGNORE)
        for i, image_id in enumerate(ids):
            labels = canvas(i) if status[i] == ImageStatus.OK else None
            if labels is None:
                missing.append(image_id)
                labels = np.full((s, s), IGNORE, dtype=np.uint8)
            masks[i] = labels
            digest.update(labels.tobytes())
            valid = labels[labels != IGNORE]
            counts[i] = valid.size
            hist += np.bincount(valid, minlength=num_classes)[:num_classes]
            if progress:
                progress(i + 1, len(ids))
        provenance = attrs(missing)
        f.create_dataset("pixel_count", data=counts)
        f.create_dataset("class_histogram", data=hist)
        if image_labels is not None:  # the masks are all 255 here: the rows are the content to fingerprint
            f.create_dataset("image_labels", data=image_labels)
            digest.update(image_labels.tobytes())
        content = counts.sum() / max(
            1, sum(g.resized_height * g.resized_width for g, st in zip(geoms, status, strict=True) if st == ImageStatus.OK)
        )
        f.attrs.update({
            "ssvt_label_schema": LABEL_SCHEMA, "ssvt_version": __version__, "name": name, "points_dropped": 0,
            **provenance,
            "store_fingerprint": store.fingerprint(), "sha256": digest.hexdigest(), "num_classes": num_classes,
            "images": len(ids), "images_without_label": len(missing),
            "images_labelled": len(ids) - len(missing) if image_labels is not None else int((counts > 0).sum()),
            "labelled_fraction": float(content), "class_histogram": json.dumps(hist.tolist()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })  # fmt: skip
    return LabelSet.open(path)


def _check_coverage(source: LabelSource, store: FeatureStore, missing: list[str], reader: KindReader, strict: bool) -> None:
    if reader.image_level is not None and not set(store.ids) & set(reader.image_level):
        raise LabelError(f"label source {source.name!r} ({source.path}) has no entry for any image id of {store.path}")
    if len(missing) == store.n_images:
        raise LabelError(
            f"label source {source.name!r} ({source.path}) has no label for any of the {store.n_images} images of "
            f"{store.path} (first id {store.ids[0]!r}); do the file names match the image ids?"
        )
    if missing and strict:
        raise LabelError(f"{len(missing)} images have no label in {source.name!r} (first: {missing[0]}); --strict stops here")


def _image_level_rows(image_level: dict[str, np.ndarray], ids: list[str]) -> np.ndarray:
    """(N, C) float32 class flags in store order; zeros for ids without an entry."""
    width = len(next(iter(image_level.values())))
    return np.stack([image_level.get(i, np.zeros(width, np.float32)) for i in ids]).astype(np.float32)
