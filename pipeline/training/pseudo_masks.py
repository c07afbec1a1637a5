"""Dense pseudo-masks from image-level labels, made from the cached tokens (``ssvt pseudo-masks``).

The method, in four steps, all on the feature store the head will later train on:

1. **Classifier.** A BatchNorm + 1x1 conv head maps every patch token to one logit per foreground
   class. Log-sum-exp pooling over the image's content tokens, ``(1/r) log mean exp(r z)``, gives
   the image logit, trained with binary cross-entropy against the ``cls_labels.npy`` flags. LSE
   sits between average pooling (every patch must show the class: blurry maps that spill onto the
   background) and max pooling (one patch suffices: maps that find only the most telling part);
   ``r = 5`` is the usual middle.
2. **Class activation maps.** For each class the image is labelled with, the per-token logits
   (averaged with the mirrored view when the store has one), ReLU, divided by their maximum over
   the image: a map in [0, 1] on the token grid, upsampled bilinearly to the canvas.
3. **Mask.** A pixel is background where every labelled class scores below the threshold ``t``,
   else the best-scoring labelled class. Pixels whose best score lies within ``band`` of ``t`` are
   255 (not confident). ``t`` is chosen on the training split by mIoU against ground truth when a
   ground-truth source is given, else :data:`DEFAULT_THRESHOLD`; the label set records which.
4. **Shape prior (optional).** K-means over the image's own tokens (as ``ssvt kmeans-viz`` draws it);
   each cluster takes the label that holds most of its confident pixels, when that label holds at
   least ``min_share`` of them, else the cluster becomes 255. A cluster can only take a label its
   pixels already had, so no class the image is not labelled with can appear.

Usage::

    result = make_pseudo_masks(store, ws.label_source("cls"), PseudoMaskConfig(out_labels="cam"), num_classes=21,
                               gt=ws.labels["gt"])
    result.labels.path, result.threshold, result.quality   # train.labels.cam.h5; then train-head --labels cam
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import __version__
from pipeline.cache.geometry import IGNORE, Geometry
from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.labels import LabelSet, ensure_labels, write_label_set
from pipeline.cache.names import ImageStatus
from pipeline.cache.store import FeatureStore
from pipeline.config import PseudoMaskConfig
from pipeline.devices import fits_in_memory, pick_device
from pipeline.errors import ConfigError, LabelError
from pipeline.figures.kmeans import cluster_image
from pipeline.heads import SegHead, build_head
from pipeline.resample import canvas_to_original
from pipeline.training.metrics import ConfusionMatrix
from pipeline.training.train import FeatureBatches, lr_lambda

if TYPE_CHECKING:
    from pipeline.figures.plots import CamRow

log = logging.getLogger(__name__)

#: Background threshold on the max-normalised CAMs when no ground truth is given to choose one.
DEFAULT_THRESHOLD = 0.3
#: Thresholds tried when choosing on the training split's ground truth.
THRESHOLDS = tuple(round(float(t), 2) for t in np.arange(0.05, 0.96, 0.05))

#: Called with (stage, done, total).
Progress = Callable[[str, int, int], None]


@dataclass
class PseudoMaskResult:
    """The label set written, how its threshold was set, and its quality against ground truth.

    quality: ``miou`` on the pixels the masks label (not 255) and ``coverage``, the fraction of
    ground-truth pixels they label; empty without ground truth. classifier: the trained token
    classifier (for :func:`class_maps`); flags: (N, K-1) the image labels it was trained on.
    """

    labels: LabelSet
    threshold: float
    threshold_source: str
    quality: dict[str, float]
    images: int
    seconds: float
    history: list[float]
    classifier: SegHead
    flags: np.ndarray


def lse_pool(logits: torch.Tensor, content: torch.Tensor, r: float) -> torch.Tensor:
    """(B, K, h, w) logits, (B, h, w) bool content -> (B, K): ``(1/r) log(mean over content of exp(r z))``."""
    z = (r * logits).masked_fill(~content[:, None], -math.inf)
    n = content.flatten(1).sum(1).clamp(min=1).to(logits.dtype)
    return (torch.logsumexp(z.flatten(2), dim=2) - torch.log(n)[:, None]) / r


def _content_grids(store: FeatureStore) -> torch.Tensor:
    """(N, h, w) bool: token cells that overlap each image's content."""
    return torch.from_numpy(np.stack([g.content_mask(grid=store.grid[0]) for g in store.geometries()]))


def train_classifier(
    store: FeatureStore, flags: np.ndarray, indices: np.ndarray, cfg: PseudoMaskConfig, progress: Progress
) -> tuple[SegHead, list[float]]:
    """The multi-label token classifier (step 1). flags: (N, K-1) float32 image labels."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    head = build_head("bn-linear", store.channels, flags.shape[1], n_layers=len(store.layers)).to(device)
    nbytes = len(indices) * store.n_views * store.grid[0] * store.grid[1] * store.channels * 2
    batches = FeatureBatches(store, indices, cfg.batch_size, device, fits_in_memory(nbytes, device))
    content = _content_grids(store)[indices].to(device)
    targets = torch.from_numpy(flags[indices]).to(device)
    total = max(cfg.epochs * math.ceil(len(indices) / cfg.batch_size), cfg.min_steps)
    optim = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The classifier keeps the schedule heads had before they took the official recipe: 5 % warm-up, power 0.9.
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda("poly", total, int(0.05 * total), power=0.9))
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[float] = []
    head.train()
    while len(history) < total:
        for pos, tokens in batches.epoch(generator):
            if len(history) == total:
                break
            view = torch.randint(0, store.n_views, (len(pos),), generator=generator)
            pos_d, flipped = pos.to(device), (view == 1).to(device)
            mask = torch.where(flipped[:, None, None], content[pos_d].flip(-1), content[pos_d])
            logits = head(tokens[torch.arange(len(pos), device=device), view.to(device)])
            loss = F.binary_cross_entropy_with_logits(lse_pool(logits.float(), mask, cfg.pooling_r), targets[pos_d])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            history.append(float(loss.detach()))
            progress("classifier", len(history), total)
    return head.eval(), history


def class_maps(head: SegHead, store: FeatureStore, index: int, classes: np.ndarray) -> np.ndarray:
    """(len(classes), h, w) float32 max-normalised CAMs of image ``index`` for foreground ``classes``
    (indices into the classifier's outputs), the mirrored view averaged in when the store has one."""
    device = next(head.parameters()).device
    with torch.inference_mode():
        tokens = torch.from_numpy(store.read_tokens(index, index + 1)).to(device)[0]  # (V, h, w, C)
        logits = head(tokens[:1]).float()[0]
        if store.n_views > 1:
            logits = (logits + head(tokens[1:2]).float()[0].flip(-1)) / 2
    cams = logits[torch.as_tensor(classes, dtype=torch.long, device=device)].relu()
    peak = cams.flatten(1).amax(1).clamp(min=1e-6)
    return (cams / peak[:, None, None]).cpu().numpy()


def to_canvas(maps: np.ndarray, geom: Geometry) -> np.ndarray:
    """(n, h, w) token-grid maps -> (n, S, S) float32 on the canvas (bilinear, half-pixel centres)."""
    if not len(maps):
        return np.zeros((0, geom.canvas, geom.canvas), np.float32)
    x = F.interpolate(torch.from_numpy(maps)[None], size=(geom.canvas, geom.canvas), mode="bilinear", align_corners=False)
    return x[0].numpy()


def decide(scores: np.ndarray, classes: np.ndarray, geom: Geometry, threshold: float, band: float) -> np.ndarray:
    """(n, S, S) canvas scores of the image's labelled ``classes`` (class ids 1..K-1) -> (S, S) uint8
    mask: background 0 below ``threshold``, else the best class; 255 within ``band`` of the threshold
    and on the padding."""
    out = np.zeros((geom.canvas, geom.canvas), np.uint8)
    if len(classes):
        best = scores.max(0)
        out = np.where(best >= threshold, np.asarray(classes, np.uint8)[scores.argmax(0)], 0).astype(np.uint8)
        out[np.abs(best - threshold) < band] = IGNORE
    out[~geom.content_mask()] = IGNORE
    return out


def refine_with_clusters(mask: np.ndarray, clusters: np.ndarray, content: np.ndarray, min_share: float) -> np.ndarray:
    """Each K-means cluster takes the label that holds most of its confident pixels, when that label
    holds at least ``min_share`` of them; else the whole cluster becomes 255. mask: (S, S) uint8;
    clusters: (h, w) ids, -1 on padding; content: (S, S) bool. Only labels already in ``mask`` appear."""
    patch = mask.shape[0] // clusters.shape[0]
    pixel_cluster = np.repeat(np.repeat(clusters, patch, axis=0), patch, axis=1)
    out = np.full_like(mask, IGNORE)
    for c in np.unique(clusters[clusters >= 0]):
        region = pixel_cluster == c
        votes = np.bincount(mask[region & (mask != IGNORE)], minlength=IGNORE)[:IGNORE]
        if votes.sum() and votes.max() >= min_share * votes.sum():
            out[region] = int(votes.argmax())
    out[~content] = IGNORE
    return out


def choose_threshold(
    canvases: Callable[[int], tuple[np.ndarray, np.ndarray, Geometry]], indices: np.ndarray, gt: LabelSet, num_classes: int
) -> tuple[float, dict[float, float]]:
    """The threshold in :data:`THRESHOLDS` whose masks (no band, no clusters) score the best mIoU
    against ``gt`` over ``indices``; also every threshold's mIoU."""
    matrices = {t: ConfusionMatrix(num_classes) for t in THRESHOLDS}
    for i in indices:
        scores, classes, geom = canvases(int(i))
        target = gt.masks(np.array([i]))[0]
        for t, cm in matrices.items():
            cm.update(decide(scores, classes, geom, t, band=0.0), target)
    mious = {t: float(cm.miou()) for t, cm in matrices.items()}
    return max(mious, key=lambda t: (mious[t], -abs(t - DEFAULT_THRESHOLD))), mious


def make_pseudo_masks(
    store: FeatureStore,
    source: LabelSource,
    cfg: PseudoMaskConfig,
    *,
    num_classes: int,
    gt: LabelSource | None = None,
    progress: Progress | None = None,
) -> PseudoMaskResult:
    """Train the token classifier on ``source``'s image labels, turn its CAMs into masks and write them
    as label set ``cfg.out_labels`` of ``store`` (see the module docstring). ``gt``, dense masks of the
    same images, chooses the threshold (unless ``cfg.threshold`` is set) and measures the masks."""
    report = progress or (lambda *_: None)
    began = time.perf_counter()
    if gt is not None:
        gt.require_dense("measuring pseudo-masks")
    image_set = ensure_labels(source, store, num_classes=num_classes, progress=lambda d, t: report("import", d, t))
    flags = image_set.image_labels()
    if flags is None:
        raise LabelError(f"{source.name!r} (kind {source.kind}) holds no image-level labels; pseudo-masks start from cls-labels")
    if flags.shape[1] != num_classes - 1:
        raise LabelError(
            f"{source.path} has {flags.shape[1]} class flags per image; {num_classes} classes need {num_classes - 1}"
        )
    indices = np.flatnonzero((store.status() == ImageStatus.OK) & flags.any(axis=1))
    if not len(indices):
        raise LabelError(f"{source.name!r} labels no extracted image of {store.path} with a foreground class")
    head, history = train_classifier(store, flags, indices, cfg, report)
    geoms = store.geometries()
    maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for j, i in enumerate(indices):
        foreground = np.flatnonzero(flags[i])
        maps[int(i)] = (foreground + 1, class_maps(head, store, int(i), foreground))
        report("class maps", j + 1, len(indices))

    def scores_of(i: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
        classes, token_maps = maps[i]
        return to_canvas(token_maps, geoms[i]), classes, geoms[i]

    gt_set = ensure_labels(gt, store, num_classes=num_classes) if gt is not None else None
    threshold, how = _threshold(cfg, gt_set, indices, scores_of, num_classes)
    quality = ConfusionMatrix(num_classes)
    covered = [0, 0]

    def canvas(i: int) -> np.ndarray | None:
        if i not in maps:
            return None
        mask = decide(*scores_of(i)[:2], geoms[i], threshold, cfg.band)
        if cfg.kmeans:
            clusters = cluster_image(store.read_tokens(i, i + 1, view=0)[0], geoms[i], cfg.kmeans, seed=cfg.seed).labels
            mask = refine_with_clusters(mask, clusters, geoms[i].content_mask(), cfg.min_share)
        if gt_set is not None:
            target = gt_set.masks(np.array([i]))[0]
            labelled = target != IGNORE
            covered[0], covered[1] = covered[0] + int((labelled & (mask != IGNORE)).sum()), covered[1] + int(labelled.sum())
            quality.update(mask, np.where(mask == IGNORE, IGNORE, target))
        return mask

    measured: dict[str, float] = {}

    def attrs(missing: list[str]) -> dict[str, Any]:
        if gt_set is not None:
            measured.update(miou=float(quality.miou()), coverage=covered[0] / max(1, covered[1]))
        method = {
            "method": "cam", "classifier": "bn-linear on cached tokens, log-sum-exp pooling, BCE", "config": cfg.to_dict(),
            "threshold": threshold, "threshold_source": how, "classifier_steps": len(history), "ssvt_version": __version__,
        }  # fmt: skip
        return {
            "kind": "mask", "sparse": False, "source": str(source.path), "source_background": "",
            "source_sha256": image_set.attrs["source_sha256"], "method": json.dumps(method),
            "quality": json.dumps(measured),
        }  # fmt: skip

    labels = write_label_set(store, cfg.out_labels, canvas, num_classes=num_classes, attrs=attrs,
                             progress=lambda d, t: report("masks", d, t))  # fmt: skip
    log.info("pseudo-masks %r: threshold %.2f (%s), quality %s", cfg.out_labels, threshold, how, measured or "not measured")
    return PseudoMaskResult(labels, threshold, how, measured, len(indices), time.perf_counter() - began, history, head, flags)


def _threshold(
    cfg: PseudoMaskConfig, gt: LabelSet | None, indices: np.ndarray, scores_of: Callable[..., Any], num_classes: int
) -> tuple[float, str]:
    if cfg.threshold is not None:
        return cfg.threshold, "given"
    if gt is None:
        return DEFAULT_THRESHOLD, "default (no ground truth to choose it)"
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(indices, size=min(len(indices), cfg.search_images), replace=False))
    best, mious = choose_threshold(scores_of, sample, gt, num_classes)
    log.info("threshold mIoU on %d training images: %s", len(sample), {t: round(m, 3) for t, m in mious.items()})
    return best, f"best mIoU against {gt.name!r} on {len(sample)} training images"


#: File stem of the CAM figure in ``ssvt pseudo-masks --out``.
CAM_FIGURE_STEM = "cam"


def cam_figure_rows(
    store: FeatureStore,
    result: PseudoMaskResult,
    *,
    gt: LabelSource | None = None,
    n: int = 6,
    seed: int = 0,
    num_classes: int = 21,
) -> list[CamRow]:
    """The rows of the CAM figure: ``n`` images with a foreground label drawn at random (``seed``), in
    store order, each at its original resolution with the CAM of every labelled class, its pseudo-mask
    and, with ``gt``, its ground truth. With ``gt``, images that have a ground-truth mask are drawn
    (any labelled image when none has)."""
    from pipeline.figures.plots import CamRow
    from pipeline.figures.shape_prior import original_image

    if n < 1:
        raise ConfigError(f"the CAM figure needs at least one image, got n = {n}")
    candidates = np.flatnonzero((store.status() == ImageStatus.OK) & result.flags.any(axis=1))
    reader = None
    if gt is not None:
        gt.require_dense("the CAM figure")
        reader = gt.reader(num_classes)
        with_gt = np.array([i for i in candidates if reader.has_mask(store.ids[i])], dtype=np.int64)
        if len(with_gt):
            candidates = with_gt
        else:
            log.warning("no labelled image of %s has a mask in %s; the CAM figure has no ground truth", store.path, gt.path)
    if not len(candidates):
        raise LabelError(f"no extracted image of {store.path} has a foreground label to draw")
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, size=min(n, len(candidates)), replace=False))
    geoms = store.geometries()
    rows = []
    for i, pseudo in zip(chosen, result.labels.masks(chosen), strict=True):
        geom, image_id = geoms[i], store.ids[i]
        foreground = np.flatnonzero(result.flags[i])
        canvas = torch.from_numpy(to_canvas(class_maps(result.classifier, store, int(i), foreground), geom))
        cams = canvas_to_original(canvas, geom).clamp(0.0, 1.0).numpy()
        mask = canvas_to_original(torch.from_numpy(pseudo), geom, mode="nearest").numpy()
        found = reader.original(image_id, geom) if reader is not None else None
        image = original_image(store, int(i), geom)
        row_cams = [(int(c) + 1, cam) for c, cam in zip(foreground, cams, strict=True)]
        rows.append(CamRow(image_id, image, row_cams, mask, gt=None if found is None else found[1]))
    return rows


def draw_cam_figure(
    store: FeatureStore,
    result: PseudoMaskResult,
    out_dir: Path,
    *,
    gt: LabelSource | None = None,
    n: int = 6,
    seed: int = 0,
    num_classes: int = 21,
) -> tuple[Path, Path]:
    """Write ``out_dir/cam.png`` and ``cam.pdf``: :func:`cam_figure_rows` drawn by
    :func:`pipeline.figures.plots.cam_figure` (the threshold as a white line on each CAM)."""
    from pipeline.cache.voc import CLASS_NAMES
    from pipeline.figures.plots import cam_figure

    rows = cam_figure_rows(store, result, gt=gt, n=n, seed=seed, num_classes=num_classes)
    names = CLASS_NAMES if num_classes <= len(CLASS_NAMES) else [str(c) for c in range(num_classes)]
    random = " (random init)" if str(store.attrs.get("weights_source", "")).startswith("random") else ""
    title = (
        f"{store.backbone}{random} tokens, {store.size} px: class activation maps (blue 0 to red 1; white line: "
        f"threshold {result.threshold:.2f}) and pseudo-masks {result.labels.name!r}"
    )
    return cam_figure(rows, out_dir / CAM_FIGURE_STEM, class_names=names, threshold=result.threshold, title=title)
