"""What a feature store's metadata must hold (cache_layout.md, "Attributes" and "Arrays"): the schema
version, the dimension names of every array, the default shard size and the checks that turn the
inputs of ``FeatureStore.create`` into the group attributes. No zarr here: :mod:`pipeline.cache.store`
writes what this module decides. Usage::

    per_shard = default_images_per_shard((32, 32), 1024, views=1)          # 64 images, about 128 MiB
    meta = group_attrs(ids, views, grid, channels, attrs, per_shard, sources)
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pipeline import __version__
from pipeline.cache.geometry import PATCH
from pipeline.errors import StoreError

SCHEMA_VERSION = 1

_REQUIRED: dict[str, type | tuple[type, ...]] = {"backbone": str, "layers": (list, tuple), "size": int}
_CHECKED = ("ssvt_schema", "grid", "channels", "views", "dtype", "images_per_shard", "n_images")
_OWNED = (*_CHECKED, "ssvt_version", "created", "ids", "sources")
# zarr v3 dimension names, shared across arrays so that xarray lines them up (cache_layout.md, "Arrays").
# Older schema-1 stores name only those of tokens and lack the coordinate arrays; ssvt needs neither.
DIMENSION_NAMES: dict[str, tuple[str, ...]] = {
    "tokens": ("image", "view", "row", "col", "channel"),
    "cls": ("image", "view", "channel"),
    "geometry": ("image", "geometry_field"),
    "status": ("image",),
    "shard_done": ("shard",),
}
NODES = {"zarr.json", *DIMENSION_NAMES, "image", "view", "geometry_field"}  # top-level names in a store


def default_images_per_shard(grid: tuple[int, int], channels: int, views: int, target_bytes: int = 128 * 2**20) -> int:
    """Images per shard so that a full tokens shard holds about ``target_bytes`` (at least 1)."""
    per_image = views * grid[0] * grid[1] * channels * 2
    return max(1, round(target_bytes / per_image))


def _check_json(key: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"store attribute {key!r} must be plain JSON (str/int/float/list/dict): {e}") from e


def group_attrs(
    ids: Sequence[str],
    views: Sequence[str],
    grid: tuple[int, int],
    channels: int,
    attrs: dict[str, Any],
    images_per_shard: int,
    sources: Sequence[str] | None,
) -> dict[str, Any]:
    """Validate the inputs of :meth:`FeatureStore.create`; return the group attributes."""

    for key, kind in _REQUIRED.items():
        if not isinstance(attrs.get(key), kind):
            raise StoreError(f"store attribute {key!r} is missing or has the wrong type: {attrs.get(key)!r}")
    layers, size, patch = attrs["layers"], attrs["size"], attrs.get("patch", PATCH)
    if not layers or not all(isinstance(x, int) for x in layers):
        raise StoreError(f"store attribute 'layers' must be a non-empty list of ints, got {layers!r}")
    if type(patch) is not int or patch < 1:
        raise StoreError(f"store attribute 'patch' must be a positive int, got {patch!r}")
    if size <= 0 or size % patch or tuple(grid) != (size // patch, size // patch):
        raise StoreError(
            f"grid {tuple(grid)} does not fit size {size} at patch {patch}: expected ({size // patch}, {size // patch})"
        )
    if channels <= 0:
        raise StoreError(f"channels must be positive, got {channels}")
    if not ids or not all(isinstance(i, str) and i for i in ids):
        raise StoreError("ids must be a non-empty list of non-empty strings")
    if len(set(ids)) != len(ids):
        dup = next(i for i, count in Counter(ids).items() if count > 1)
        raise StoreError(f"ids must be distinct: {dup!r} appears more than once")
    if not views or len(set(views)) != len(views) or not all(isinstance(v, str) and v for v in views):
        raise StoreError(f"views must be distinct non-empty names, got {list(views)!r}")
    if sources is not None and len(sources) != len(ids):
        raise StoreError(f"got {len(sources)} sources for {len(ids)} ids")
    owned = {
        "ssvt_schema": SCHEMA_VERSION,
        "ssvt_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "patch": patch,
        "grid": [int(grid[0]), int(grid[1])],
        "channels": int(channels),
        "views": list(views),
        "dtype": "float16",
        "images_per_shard": int(images_per_shard),
        "n_images": len(ids),
        "ids": list(ids),
        "sources": None if sources is None else [str(s) for s in sources],
    }
    for key in _CHECKED:  # a caller may repeat what the store computes, but not contradict it
        if key in attrs and json.loads(json.dumps(attrs[key])) != owned[key]:
            raise StoreError(f"store attribute {key!r} is {attrs[key]!r} but the store computes {owned[key]!r}")
    out = {k: v for k, v in attrs.items() if k not in _OWNED}
    for key, value in out.items():
        _check_json(key, value)
    out["layers"] = list(layers)
    return {**out, **owned}
