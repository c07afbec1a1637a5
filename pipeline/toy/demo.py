"""The one-command tour: toy data -> features -> a head per label type -> mIoU table + K-means figure.

Usage: ``ssvt demo`` (or ``run_demo(Path("ssvt-demo"))``). Runs offline on a CPU in a couple of
minutes. With real DINOv2 ViT-S/14 weights in the torch hub or HF cache it uses them; otherwise a
seeded random initialisation, which the result says plainly.

Besides the label sets of the toy workspace, the tour makes one itself: CAM pseudo-masks from the
image-level ``cls`` labels (``ssvt pseudo-masks``, :mod:`pipeline.training.pseudo_masks`), written
as label set ``cam`` beside the training store and trained on like the others.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.store import FeatureStore
from pipeline.config import DemoConfig, ExtractConfig, KMeansVizConfig
from pipeline.errors import WeightsNotFoundError
from pipeline.features.backbones import resolve_weights
from pipeline.features.data import find_images
from pipeline.features.extract import extract, store_path
from pipeline.figures.shape_prior import KMeansVizResult, kmeans_viz
from pipeline.toy.dataset import make_toy
from pipeline.training.pseudo_masks import PseudoMaskResult, make_pseudo_masks
from pipeline.training.runs import RunOutcome, StageProgress, train_and_evaluate
from pipeline.workspace import Workspace

log = logging.getLogger(__name__)

#: Called with (stage, done, total, loss or None): the progress of train-head, with more stages.
DemoProgress = StageProgress


@dataclass
class DemoResult:
    """pseudo_quality: the toy pseudo-labels' own mIoU against ground truth on the train split
    (``miou_seam``, ``miou_eps``, ``miou_vl``: confident pixels only) and ``vl_coverage``.
    pseudo_masks: the CAM pseudo-masks the demo made from image-level labels (their ``quality``:
    ``miou`` on the pixels they label, ``coverage``), or None when ``cfg.labels`` does not name them."""

    out: Path
    weights: str
    pretrained: bool
    runs: list[RunOutcome]
    kmeans: KMeansVizResult
    pseudo_quality: dict[str, float]
    pseudo_masks: PseudoMaskResult | None = None


def _weights(model: str) -> tuple[str | None, bool]:
    """Local pretrained weights when some cache has them (never downloads)."""
    try:
        return str(resolve_weights(model, None, allow_download=False)), True
    except WeightsNotFoundError:
        return None, False


def run_demo(out: Path, cfg: DemoConfig | None = None, *, progress: DemoProgress | None = None) -> DemoResult:
    cfg = cfg or DemoConfig()
    report = progress or (lambda *_: None)
    toy = make_toy(out, n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed,
                   progress=_counter("make toy data", cfg.n_train + cfg.n_val, report))  # fmt: skip
    ws = Workspace.load(toy.workspace)
    weights, pretrained = _weights(cfg.model)
    ecfg = ExtractConfig(model=cfg.model, size=cfg.size, flip=True, weights=weights, random_init=not pretrained,
                         workers=min(2, os.cpu_count() or 1), seed=cfg.seed)  # fmt: skip
    assert ws.train_split is not None
    assert ws.val_split is not None
    for split in (ws.train_split, ws.val_split):
        extract(find_images(ws.data_root, split, ws.data_format), store_path(ecfg, ws.layout, split), ecfg,
                overwrite=True, progress=_stage(f"extract {split}", report))  # fmt: skip
    cam = None
    if cfg.pseudo_masks.out_labels in cfg.labels:
        pcfg = replace(cfg.pseudo_masks, seed=cfg.seed)
        train = FeatureStore.open(store_path(ecfg, ws.layout, ws.train_split))
        cam = make_pseudo_masks(train, ws.label_source(pcfg.labels), pcfg, num_classes=ws.num_classes, gt=ws.labels["gt"],
                                progress=_unlossed(pcfg.out_labels, report))  # fmt: skip
    runs = []
    for name in cfg.labels:
        tcfg = replace(cfg.train, labels=name, seed=cfg.seed)
        labelled: LabelSource | str = name if cam is not None and name == cam.labels.name else ws.label_source(name)
        runs.append(train_and_evaluate(tcfg, labelled, ws, gt=ws.labels["gt"], out=ws.layout.run_dir(name),
                                       progress=_prefixed(name, report)))  # fmt: skip
    val = FeatureStore.open(store_path(ecfg, ws.layout, ws.val_split))
    kcfg = KMeansVizConfig(ks=(2, 4, 6), n=cfg.kmeans_images, seed=cfg.seed, num_classes=ws.num_classes)
    figure = kmeans_viz(val, out / "kmeans", kcfg, gt=ws.labels["gt"],
                        progress=_counter("k-means figure", cfg.kmeans_images, report))  # fmt: skip
    source = weights if pretrained else f"random init of {cfg.model} (no pretrained weights in the local caches)"
    quality = {k: float(v) for k, v in toy.summary.items() if k.startswith("miou_") or k == "vl_coverage"}
    return DemoResult(out, str(source), pretrained, runs, figure, quality, cam)


def _stage(stage: str, report: DemoProgress) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        report(stage, done, total, None)

    return update


def _prefixed(prefix: str, report: DemoProgress) -> DemoProgress:
    def update(stage: str, done: int, total: int, loss: float | None) -> None:
        report(f"{prefix}: {stage}", done, total, loss)

    return update


def _unlossed(prefix: str, report: DemoProgress) -> Callable[[str, int, int], None]:
    """Progress of a step that reports no loss (pseudo-masks: classifier, class maps, masks)."""

    def update(stage: str, done: int, total: int) -> None:
        report(f"{prefix}: {stage}", done, total, None)

    return update


def _counter(stage: str, total: int, report: DemoProgress) -> Callable[[int], None]:
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        report(stage, done[0], total, None)

    return step
