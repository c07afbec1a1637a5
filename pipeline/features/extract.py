"""Stage one: run a frozen backbone once over a dataset and write its patch tokens to a feature store.

Usage::

    items = find_images("VOCdevkit/VOC2012", split="val")
    cfg = ExtractConfig(model="dinov2_vitl14")
    summary = extract(items, store_path(cfg, workspace.layout, "val"), cfg)   # cache/dinov2_vitl14-448-last/val.zarr

Decoding and resizing run in DataLoader workers, inference under ``torch.inference_mode`` (bf16/fp16
autocast on CUDA, fp32 on CPU), and finished shards are written by a background thread, so the
model never waits for the disk. A rerun after a crash finishes the missing shards only; batches
never straddle shards, so a resumed store is identical to an uninterrupted one.

Several processes can fill one store (``ranks``, pipeline.distributed). Under ``torchrun``
(``Ranks.from_environment()``) rank 0 resumes or creates the store while the others wait, each rank
writes the whole shards dealt to it, rank 0 reports the progress of all, and every rank returns the
summary of all. Parts of a job array (``Ranks.from_part("2/4")``, no process group) take the missing
shards whose number is theirs and race to create the store (the loser resumes it); a plain run
afterwards finishes whatever is left. A shard is computed the same way by whoever computes it, so
the store is byte-identical to one written by a single process::

    extract(items, "cache/m-448-last/val.zarr", cfg, ranks=Ranks.from_environment())
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import __version__
from pipeline.cache.geometry import check_size
from pipeline.cache.names import CacheLayout, ImageStatus, Location, StoreIdentity, StorePath, cache_name, legacy_cache_name
from pipeline.cache.schema import default_images_per_shard
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig
from pipeline.devices import OomBackoff, autocast, pick_device, pin_memory
from pipeline.distributed import Ranks
from pipeline.errors import ConfigError, DataError, StoreError, StoreMismatchError
from pipeline.features.backbones import Backbone, build_backbone, get_spec, resolve_layers, resolve_weights
from pipeline.features.data import CanvasDataset, ImageItem, find_images
from pipeline.features.sharing import Progress, RunProgress, shared_store
from pipeline.workspace import WORKSPACE_FILE, Workspace

log = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    """What one ``extract`` call did: in this process, or in all ranks of a group (:meth:`combine`).

    ``shards_skipped``: shards already done when the call began; ``shards_missing``: shards not done
    when it returned (those of the other parts of a job array, or 0); ``seconds``: the extraction
    loop of the slowest process; ``processes``: how many shared the work.
    """

    store_path: StorePath
    n_images: int
    device: str
    weights_source: str
    shards_written: int = 0
    shards_skipped: int = 0
    images_done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    seconds: float = 0.0
    processes: int = 1
    shards_missing: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images_done / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def combine(cls, parts: list[ExtractSummary]) -> ExtractSummary:
        """The summary of a run that ``parts`` (one per rank, rank 0 first) shared: counts and failures
        added up, the time of the slowest rank, the shards already done as rank 0 found them."""
        first = parts[0]
        return cls(
            first.store_path, first.n_images, ", ".join(dict.fromkeys(p.device for p in parts)), first.weights_source,
            shards_written=sum(p.shards_written for p in parts), shards_skipped=first.shards_skipped,
            images_done=sum(p.images_done for p in parts), failed=[f for p in parts for f in p.failed],
            seconds=max(p.seconds for p in parts), processes=len(parts),
        )  # fmt: skip


def plan_extract(
    cfg: ExtractConfig,
    ws: Workspace | None,
    *,
    data: Path | None = None,
    splits: list[str] | None = None,
    out: StorePath | None = None,
) -> list[tuple[str, list[ImageItem], StorePath]]:
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
    targets: list[tuple[str, list[ImageItem], StorePath]] = []
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


def store_path(cfg: ExtractConfig, layout: CacheLayout, split: str) -> Location:
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


def open_or_create(
    path: StorePath, items: list[ImageItem], cfg: ExtractConfig, backbone: Backbone, overwrite: bool
) -> FeatureStore:
    """Resume a store made with the same settings, refuse one made with others, or create one.

    Processes that start together (parts of a job array) may all find no store and try to create it:
    one rename wins, and the others resume the store it made, checked like any other."""
    layers = resolve_layers(cfg.layers, backbone.depth)
    check_size(cfg.size, backbone.patch_size, cfg.model)
    grid = (cfg.size // backbone.patch_size, cfg.size // backbone.patch_size)
    channels = backbone.hidden_size * len(layers)
    attrs = store_attrs(cfg, backbone, layers)
    ids = [item.id for item in items]
    wanted = StoreIdentity.from_attrs({**attrs, "views": cfg.views, "grid": grid, "channels": channels})
    if FeatureStore.exists(path):
        if not overwrite:
            return _resume(path, wanted, ids, cfg.images_per_shard)
        FeatureStore.remove(path)
    per_shard = cfg.images_per_shard or default_images_per_shard(grid, channels, len(cfg.views))
    try:
        return FeatureStore.create(
            path, ids=ids, views=list(cfg.views), grid=grid, channels=channels, attrs=attrs,
            images_per_shard=min(per_shard, max(1, len(ids))), sources=[str(item.path) for item in items],
        )  # fmt: skip
    except StoreError:
        if not FeatureStore.exists(path):  # a failure of its own, not a store created meanwhile
            raise
    log.info("%s was created by another process meanwhile: resuming it", path)
    return _resume(path, wanted, ids, cfg.images_per_shard)


def _resume(path: StorePath, wanted: StoreIdentity, ids: list[str], images_per_shard: int | None) -> FeatureStore:
    """The store at ``path`` open for writing, if it holds what this run would write."""
    store = FeatureStore.open(path, mode="r+")
    diffs = differences(store, wanted, ids, images_per_shard)
    if diffs:
        raise StoreMismatchError(
            f"{path} was made with other settings ({'; '.join(diffs)}); "
            "pass --overwrite to replace it or --out to write elsewhere"
        )
    return store


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
    out: StorePath,
    cfg: ExtractConfig,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    backbone: Backbone | None = None,
    ranks: Ranks | None = None,
) -> ExtractSummary:
    """Write (or finish) the feature store at ``out`` for ``items``. See the module docstring.

    ``ranks`` shares the work among processes (default: this one alone). Under a process group every
    rank calls this with the same arguments and gets the summary of all ranks; ``progress`` is
    called on rank 0 only, with the images of all ranks. A part of a job array reports and returns
    its own share, and ``shards_missing`` counts the shards left to the other parts.
    """
    if not items:
        raise DataError("no images to extract")
    ranks = ranks if ranks is not None else Ranks.single()
    if overwrite and ranks.world > 1 and not ranks.group:
        raise ConfigError(
            f"--overwrite with --part {ranks.rank + 1}/{ranks.world} could delete what the other parts wrote: "
            "remove the store first, or overwrite it in a run without --part"
        )
    device = pick_device(ranks.device(cfg.device))
    backbone = backbone if backbone is not None else load_backbone(cfg)
    store = shared_store(out, lambda: open_or_create(out, items, cfg, backbone, overwrite), ranks)
    missing = store.missing_shards()  # under a group, rank 0's list is the one dealt
    mine = ranks.deal_shards(missing)
    log.info("%s: %d of %d shards missing, %d of them here", ranks.label or "extract", len(missing), store.n_shards, len(mine))
    summary = ExtractSummary(out, len(items), str(device), backbone.weights_source, shards_skipped=store.n_shards - len(missing))
    tally = None
    if progress is not None and ranks.reports:
        tally = RunProgress(store, missing if ranks.group else mine, mine, summary, progress, poll=ranks.group)
    error = None
    try:
        _extract_shards(items, store, mine, cfg, backbone, device, summary, tally)
    except Exception as exc:
        if not ranks.group:
            raise
        error = exc  # raised at the final sync point, where the other ranks learn of it too
    try:
        ranks.check(error, f"extracting {out}")
        total = ExtractSummary.combine(ranks.gather(summary))
    finally:
        if tally is not None:
            tally.stop()
    total.shards_missing = len(store.missing_shards())
    if tally is not None:
        tally.report(total.images_done)  # all ranks' images, now that every rank has finished
    return total


def _extract_shards(
    items: list[ImageItem],
    store: FeatureStore,
    shards: list[int],
    cfg: ExtractConfig,
    backbone: Backbone,
    device: torch.device,
    summary: ExtractSummary,
    tally: RunProgress | None,
) -> None:
    """Compute and write the whole ``shards`` of ``store``, counting into ``summary``."""
    if not shards:
        return
    forward = Forward(backbone, tuple(store.layers), device, cfg.flip, cfg.batch_size)
    dataset = CanvasDataset(items, cfg.size, backbone.mean, backbone.std)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=shard_batches(store, shards, cfg.batch_size), num_workers=cfg.workers,
        pin_memory=pin_memory(device), prefetch_factor=4 if cfg.workers else None,
    )  # fmt: skip
    writer = ShardWriter(store)
    began = time.perf_counter()
    try:
        for buffer in _fill_shards(loader, store, forward, summary, cfg.strict):
            writer.submit(buffer.shard, buffer.tokens, buffer.cls, buffer.geometry, buffer.status)
            if tally is not None:
                tally.report()
    finally:
        writer.close()  # shards finished before an error are kept
        summary.seconds = time.perf_counter() - began
        summary.shards_written = writer.written


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
