"""``ssvt predict``: a trained head's predictions for images that need no ground truth.

Usage::

    summary = predict("runs/eps-bn-linear", "preds/", items=find_images("photos/"), protocol="lin", overlay=True)
    # preds/<id>.png            palette PNG of class ids at the original size (the VOC test-server format)
    # preds/overlay/<id>.png    the image blended with class colours, legend of the classes present below
    # preds/probs/<id>.npz      with probs=True: see cache_layout.md, "Prediction files"

"lin" and "ms" run the backbone online (:mod:`pipeline.inference.online`); "cache" reads the cached
canvas of a feature store (view 0) as ``ssvt evaluate`` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.names import ImageStatus, RunFiles, StrPath
from pipeline.cache.store import FeatureStore
from pipeline.devices import pick_device
from pipeline.errors import ConfigError
from pipeline.features.backbones import resolve_layers
from pipeline.features.data import ImageItem, load_rgb
from pipeline.inference.evaluate import _backbone, load_for_protocol
from pipeline.inference.online import OnlinePredictor
from pipeline.inference.protocols import CACHE, get_protocol
from pipeline.resample import canvas_to_original
from pipeline.training.evaluate import check_compatible, class_names, load_run, save_palette_png

log = logging.getLogger(__name__)

#: Probabilities are stored as uint8: p ~= value / PROB_SCALE.
PROB_SCALE = 255


@dataclass
class PredictSummary:
    out: Path
    protocol: str
    images: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, error)
    seconds: float = 0.0


def save_probs(probs: torch.Tensor, path: Path, names: Sequence[str]) -> None:
    """(K, H, W) probabilities -> ``path`` (.npz, compressed): ``probs`` (K, H, W) uint8 = round(255 p),
    ``classes`` the K class names."""
    quantised = (probs.float().clamp(0, 1) * PROB_SCALE).round().to(torch.uint8).cpu().numpy()
    np.savez_compressed(path, probs=quantised, classes=np.array(list(names)))


def load_probs(path: StrPath) -> tuple[np.ndarray, list[str]]:
    """(K, H, W) float32 probabilities and class names from a file :func:`save_probs` wrote."""
    with np.load(path) as data:
        return data["probs"].astype(np.float32) / PROB_SCALE, [str(n) for n in data["classes"]]


def _store_probs(run_dir: StrPath, store_path: StrPath, device: str) -> Iterator[tuple[ImageItem, torch.Tensor | None, str]]:
    """(image, (K, H, W) probabilities or None, error) for every image of a feature store (cache protocol)."""
    head, config = load_run(run_dir)
    store = FeatureStore.open(store_path)
    check_compatible(config, store)
    dev = pick_device(device)
    head = head.to(dev)
    geoms, status = store.geometries(), store.status()
    for index, image_id in enumerate(store.ids):
        item = ImageItem(image_id, Path(store.sources[index]) if store.sources else Path(image_id))
        if status[index] != ImageStatus.OK:
            yield item, None, "not extracted (failed or missing in the store)"
            continue
        with torch.inference_mode():
            logits = head(torch.from_numpy(store.read_tokens(index, index + 1, view=0)).to(dev)).float()[0]
        yield item, canvas_to_original(logits, geoms[index]).softmax(0), ""


def predict(
    run_dir: StrPath,
    out: StrPath,
    *,
    items: Sequence[ImageItem] | None = None,
    store_path: StrPath | None = None,
    protocol: str = "lin",
    overlay: bool = False,
    probs: bool = False,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> PredictSummary:
    """Write predictions of ``run_dir``'s head for ``items`` (lin/ms) or ``store_path``'s images (cache)."""
    out = Path(out)
    summary = PredictSummary(out, protocol)
    names = load_run(run_dir)[1].get("classes")
    if protocol == CACHE:
        if RunFiles(run_dir).backbone.is_file():
            raise ConfigError(f"{run_dir} fine-tuned its backbone, so the cached features do not fit it; use --protocol lin")
        if store_path is None:
            raise ConfigError("--protocol cache predicts from a feature store: pass --store (or --split with a cached split)")
        results = _store_probs(run_dir, store_path, device)
        total = FeatureStore.open(store_path).n_images
    else:
        if not items:
            raise ConfigError("no images to predict: pass --data PATH or --split NAME")
        run = load_for_protocol(run_dir, weights)
        backbone = _backbone(run)
        heads = [(run.head, resolve_layers(list(run.layers), backbone.depth))]
        predictor = OnlinePredictor(
            backbone, heads, get_protocol(protocol), pick_device(device), batch_size=batch_size, workers=workers
        )
        results = ((r.item, r.probs[0] if r.probs else None, r.error) for r in predictor.run(items))
        total = len(items)
    began = time.perf_counter()
    for folder in [out] + [out / "overlay"] * overlay + [out / "probs"] * probs:
        folder.mkdir(parents=True, exist_ok=True)
    for done, (item, p, error) in enumerate(results, 1):
        if p is None:
            summary.failed.append((item.id, error))
        else:
            _write_one(item, p, out, overlay=overlay, probs=probs, names=names)
            summary.images += 1
        if progress:
            progress(done, total)
    summary.seconds = time.perf_counter() - began
    return summary


def _write_one(item: ImageItem, p: torch.Tensor, out: Path, *, overlay: bool, probs: bool, names: list[str] | None) -> None:
    from pipeline.figures.predictions import overlay as draw_overlay

    names = class_names(p.shape[0], names)
    pred = p.argmax(0).to(torch.uint8).cpu().numpy()
    save_palette_png(pred, out / f"{item.id}.png")
    if overlay:
        draw_overlay(np.asarray(load_rgb(item.path)), pred, names).save(out / "overlay" / f"{item.id}.png")
    if probs:
        save_probs(p, out / "probs" / f"{item.id}.npz", names)
