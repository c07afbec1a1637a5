"""Stage one: run a frozen backbone once over a dataset and write its patch tokens to a feature store.

Usage::

    items = find_images("VOCdevkit/VOC2012", split="val")
    cfg = ExtractConfig(model="dinov2_vitl14")
    summary = extract(items, store_path(cfg, workspace.layout, "val"), cfg)   # cache/dinov2_vitl14-448-last/val.zarr

Decoding and resizing run in DataLoader workers, inference under ``torch.inference_mode`` (bf16/fp16
autocast on CUDA, fp32 on CPU), and finished shards are written by a background thread, so the
model never waits for the disk. A rerun after a crash finishes the missing shards only; batches
never straddle shards, so a resumed store is identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import __version__
from pipeline.cache.geometry import check_size
from pipeline.cache.names import CacheLayout, ImageStatus, StoreIdentity, cache_name, legacy_cache_name
from pipeline.cache.store import FeatureStore, default_images_per_shard
from pipeline.config import WORKSPACE_FILE, ExtractConfig, Workspace
from pipeline.devices import OomBackoff, autocast, pick_device, pin_memory
from pipeline.errors import ConfigError, DataError, StoreMismatchError
from pipeline.features.backbones import Backbone, build_backbone, get_spec, resolve_layers, resolve_weights
from pipeline.features.data import CanvasDataset, ImageItem, find_images

log = logging.getLogger(__name__)

#: Called with (images done so far, images to do in this run).
Progress = Callable[[int, int], None]


@dataclass
class ExtractSummary:
    """What one ``extract`` call did."""

    store_path: Path
    n_images: int
    device: str
    weights_source: str
    shards_written: int = 0
    shards_skipped: int = 0
    images_done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images_done / self.seconds if self.seconds > 0 else 0.0


def plan_extract(
    cfg: ExtractConfig,
    ws: Workspace | None,
    *,
    data: Path | None = None,
    splits: list[str] | None = None,
    out: Path | None = None,
) -> list[tuple[str, list[ImageItem], Path]]:
    """(name, images, store path) for each store to write: ``data`` or the workspace's dataset, each
    of ``splits`` (default: the workspace's), into ``out`` or :func:`store_path`."""
    resolved_patch(cfg)
    if data is None and ws is None:
        raise ConfigError(f"no dataset: pass --data PATH or run where a {WORKSPACE_FILE} is (see `ssvt init`)")
    root = data if data is not None else ws.data_root  # type: ignore[union-attr]
    fmt = None if data is not None else ws.data_format  # type: ignore[union-attr]
    names: list[str | None] = list(splits) if splits else (list(ws.splits) if ws and data is None else [None])
    if out is not None and len(names) > 1:
        raise ConfigError(f"--out names one store but {len(names)} splits are selected; add --split")
    if out is None and ws is None:
        raise ConfigError("no workspace to name the store after: pass --out STORE.zarr")
    targets = []
    for name in names:
        label = name or Path(root).stem
        path = out if out is not None else store_path(cfg, ws.layout, label)  # type: ignore[union-attr]
        targets.append((label, find_images(root, name, fmt), path))
    return targets


def resolved_layers(cfg: ExtractConfig) -> tuple[tuple[int, ...], int]:
    """The block indices ``cfg.layers`` names on ``cfg.model`` (with its overrides), and the depth."""
    depth = int(cfg.overrides.get("num_hidden_layers", get_spec(cfg.model).depth))
    return resolve_layers(cfg.layers, depth), depth


def resolved_patch(cfg: ExtractConfig) -> int:
    """The patch size of ``cfg.model`` (with its overrides); ConfigError, one line, when ``cfg.size``
    is not a multiple of it."""
    patch = int(cfg.overrides.get("patch_size", get_spec(cfg.model).patch))
    check_size(cfg.size, patch, cfg.model)
    return patch


def store_path(cfg: ExtractConfig, layout: CacheLayout, split: str) -> Path:
    """Where ``cfg``'s store of ``split`` goes: ``<cache>/<model>-<size>-<layers>/<split>.zarr``, named
    from the resolved layers (so ``last4`` and ``20,21,22,23`` share one cache on ViT-L); a store
    written by ssvt 0.1 under the layers as typed is still found."""
    resolved_patch(cfg)
    layers, depth = resolved_layers(cfg)
    name = cache_name(cfg.model, cfg.size, layers, depth, cfg.random_init)
    return layout.store_path(name, split, legacy_name=legacy_cache_name(cfg.model, cfg.size, cfg.layers, cfg.random_init))


def load_backbone(cfg: ExtractConfig) -> Backbone:
    """The config's backbone: pretrained weights from --weights or a local cache, or a seeded random init."""
    resolved_patch(cfg)  # a size the backbone cannot take fails before the weights are read
    if cfg.random_init:
        return build_backbone(cfg.model, None, overrides=cfg.overrides, seed=cfg.seed)
    return build_backbone(cfg.model, resolve_weights(cfg.model, cfg.weights), overrides=cfg.overrides)


def store_attrs(cfg: ExtractConfig, backbone: Backbone, layers: tuple[int, ...]) -> dict[str, Any]:
    """The attributes that describe what a store holds (cache_layout.md, "Attributes")."""
    return {
        "ssvt_version": __version__,
        "backbone": cfg.model,
        "weights_sha256": backbone.fingerprint,
        "weights_source": backbone.weights_source,
        "layers": list(layers),
        "size": cfg.size,
        "patch": backbone.patch_size,
        "normalization": {"mean": list(backbone.mean), "std": list(backbone.std)},
        "dtype": "float16",
        "geometry_policy": "resize longer side to size (bicubic, antialiased), pad centred to size x size with 0",
        "extract_config": {k: v for k, v in cfg.to_dict().items() if k not in ("batch_size", "workers", "device", "strict")},
    }


def differences(store: FeatureStore, wanted: StoreIdentity, ids: list[str], images_per_shard: int | None) -> list[str]:
    """Human-readable differences between an existing store and what this run would write."""
    diffs = store.identity.differences(wanted, ours="store has", theirs="this run has")
    if list(store.ids) != list(ids):
        diffs.append(f"images: store has {store.n_images} ids, this run has {len(ids)} (or another order)")
    if images_per_shard is not None and images_per_shard != store.images_per_shard:
        diffs.append(f"images_per_shard: store has {store.images_per_shard}, this run has {images_per_shard}")
    return diffs


def open_or_create(path: Path, items: list[ImageItem], cfg: ExtractConfig, backbone: Backbone, overwrite: bool) -> FeatureStore:
    """Resume a store made with the same settings, refuse one made with others, or create one."""
    layers = resolve_layers(cfg.layers, backbone.depth)
    check_size(cfg.size, backbone.patch_size, cfg.model)
    grid = (cfg.size // backbone.patch_size, cfg.size // backbone.patch_size)
    channels = backbone.hidden_size * len(layers)
    attrs = store_attrs(cfg, backbone, layers)
    ids = [item.id for item in items]
    if FeatureStore.exists(path):
        if overwrite:
            FeatureStore.remove(path)
        else:
            store = FeatureStore.open(path, mode="r+")
            wanted = StoreIdentity.from_attrs({**attrs, "views": cfg.views, "grid": grid, "channels": channels})
            diffs = differences(store, wanted, ids, cfg.images_per_shard)
            if diffs:
                raise StoreMismatchError(
                    f"{path} was made with other settings ({'; '.join(diffs)}); "
                    "pass --overwrite to replace it or --out to write elsewhere"
                )
            return store
    per_shard = cfg.images_per_shard or default_images_per_shard(grid, channels, len(cfg.views))
    return FeatureStore.create(
        path, ids=ids, views=list(cfg.views), grid=grid, channels=channels, attrs=attrs,
        images_per_shard=min(per_shard, max(1, len(ids))), sources=[str(item.path) for item in items],
    )  # fmt: skip


class ShardWriter:
    """Writes finished shards on a background thread; errors surface on the next call."""

    def __init__(self, store: FeatureStore, depth: int = 2):
        self.store = store
        self.queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, name="ssvt-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.store.write_shard(*job)
                    self.written += 1
                except BaseException as exc:  # re-raised in the main thread
                    self.error = exc

    def submit(self, *job: Any) -> None:
        self._raise()
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


class ShardBuffer:
    """Collects one shard's batches in host memory: tokens (n, V, h, w, C) float16 and the rest."""

    def __init__(self, shard: int, start: int, stop: int, views: int, grid: tuple[int, int], channels: int):
        n = stop - start
        self.shard, self.start, self.filled = shard, start, 0
        self.tokens = np.zeros((n, views, *grid, channels), dtype=np.float16)
        self.cls = np.zeros((n, views, channels), dtype=np.float16)
        self.geometry = np.zeros((n, 6), dtype=np.int32)
        self.status = np.zeros(n, dtype=np.uint8)

    @property
    def full(self) -> bool:
        return self.filled == len(self.status)


def shard_batches(store: FeatureStore, shards: list[int], batch_size: int) -> list[list[int]]:
    """Batches of image indices that never straddle a shard, so results do not depend on where a
    previous run stopped."""
    batches = []
    for shard in shards:
        start, stop = store.shard_range(shard)
        batches += [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
    return batches


class Forward:
    """The frozen backbone on a device, with the flip view and halving of the batch on CUDA OOM."""

    def __init__(self, backbone: Backbone, layers: tuple[int, ...], device: torch.device, flip: bool, chunk: int):
        self.backbone, self.layers, self.device, self.flip = backbone.to(device), layers, device, flip
        self.chunks = OomBackoff(chunk)

    def __call__(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """pixels (B, 3, S, S) -> tokens (B, V, h, w, C) float16 and cls (B, V, C) float16."""
        parts = self.chunks(self._run, pixels)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _run(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = pixels.to(self.device, non_blocking=True)
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        with torch.inference_mode(), autocast(self.device):
            tokens, cls = self.backbone(x, self.layers)
        b, v = len(pixels), 2 if self.flip else 1
        tokens = tokens.to(torch.float16).reshape(v, b, *tokens.shape[1:]).transpose(0, 1)
        cls = cls.to(torch.float16).reshape(v, b, -1).transpose(0, 1)
        return tokens.cpu().numpy(), cls.cpu().numpy()


def extract(
    items: list[ImageItem],
    out: str | Path,
    cfg: ExtractConfig,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    backbone: Backbone | None = None,
) -> ExtractSummary:
    """Write (or finish) the feature store at ``out`` for ``items``. See the module docstring."""
    if not items:
        raise DataError("no images to extract")
    out = Path(out)
    device = pick_device(cfg.device)
    backbone = backbone if backbone is not None else load_backbone(cfg)
    store = open_or_create(out, items, cfg, backbone, overwrite)
    layers = tuple(store.layers)
    summary = ExtractSummary(out, len(items), str(device), backbone.weights_source)
    missing = store.missing_shards()
    summary.shards_skipped = store.n_shards - len(missing)
    batches = shard_batches(store, missing, cfg.batch_size)
    total = sum(len(b) for b in batches)
    if progress:
        progress(0, total)
    forward = Forward(backbone, layers, device, cfg.flip, cfg.batch_size)
    dataset = CanvasDataset(items, cfg.size, backbone.mean, backbone.std)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=cfg.workers, pin_memory=pin_memory(device),
        prefetch_factor=4 if cfg.workers else None,
    )  # fmt: skip
    writer = ShardWriter(store)
    began = time.perf_counter()
    try:
        for buffer in _fill_shards(loader, store, forward, summary, cfg.strict):
            writer.submit(buffer.shard, buffer.tokens, buffer.cls, buffer.geometry, buffer.status)
            if progress:
                progress(summary.images_done, total)
    finally:
        writer.close()  # shards finished before an error are kept
    summary.seconds = time.perf_counter() - began
    summary.shards_written = writer.written
    return summary


def _fill_shards(
    loader: Any, store: FeatureStore, forward: Forward, summary: ExtractSummary, strict: bool
) -> Iterator[ShardBuffer]:
    """Runs the model batch by batch and yields each shard's buffer once it is full."""
    buffer: ShardBuffer | None = None
    for indices, pixels, geometry, errors in loader:
        tokens, cls = forward(pixels)
        for j, index in enumerate(indices.tolist()):
            if buffer is None:
                shard = store.shard_of(index)
                buffer = ShardBuffer(shard, *store.shard_range(shard), store.n_views, store.grid, store.channels)
            row = index - buffer.start
            if errors[j]:
                if strict:
                    raise DataError(f"{errors[j]} (--strict stops at the first bad image)")
                summary.failed.append((str(store.sources[index]) if store.sources else store.ids[index], errors[j]))
                buffer.status[row] = ImageStatus.FAILED
            else:
                buffer.tokens[row], buffer.cls[row] = tokens[j], cls[j]
                buffer.geometry[row], buffer.status[row] = geometry[j].numpy(), ImageStatus.OK
            buffer.filled += 1
            summary.images_done += 1
            if buffer.full:
                yield buffer
                buffer = None
