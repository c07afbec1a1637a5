"""The shape prior of frozen patch tokens: K-means over one image's tokens, and how well it outlines objects.

Only content patches (those holding at least one image pixel, see :meth:`Geometry.content_mask`) are
clustered; padding patches get label -1 and never influence the clusters. Usage::

    res = cluster_image(tokens, geom, k=4)          # tokens: (h, w, C) float16 from the feature store
    clusters = to_original(res.labels, geom)        # (H, W) int16
    score = hungarian_score(clusters, gt, NUM_CLASSES)
    score.miou, score.mapping                       # best one-to-one cluster -> class matching
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning

from pipeline.cache.geometry import IGNORE, Geometry
from pipeline.errors import ConfigError, LabelError
from pipeline.resample import canvas_to_original

logger = logging.getLogger(__name__)

#: Label of padding patches in :attr:`ClusterResult.labels`.
PAD_LABEL = -1


@dataclass(frozen=True)
class ClusterResult:
    """K-means clusters of one image's patch tokens.

    labels: (h, w) int16 cluster ids in ``[0, k)``, :data:`PAD_LABEL` on padding patches.
    centroids: (k, C) float32 in the space that was clustered (unit-normalised tokens by default).
    inertia: sum of squared distances of this image's content tokens to their centroids.
    """

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float


@dataclass(frozen=True)
class MatchResult:
    """Clusters scored against ground truth after the best one-to-one matching to classes.

    miou: mean IoU over the classes present in the ground truth (NaN if it has no labelled pixel).
    mapping: cluster id -> class id for matched pairs that overlap; every other cluster is "void".
    per_class_iou: (num_classes,) float64, NaN for classes absent from the ground truth.
    """

    miou: float
    mapping: dict[int, int]
    per_class_iou: np.ndarray


@dataclass(frozen=True)
class ShapeScore:
    """Per-image Hungarian mIoU over a set of images, and its mean over images that have labels."""

    miou: float
    per_image: tuple[float, ...]


def _grid(tokens: np.ndarray, geom: Geometry) -> int:
    if tokens.ndim != 3 or tokens.shape[0] != tokens.shape[1]:
        raise ConfigError(f"tokens must be (h, h, C) on a square grid, got shape {tokens.shape}")
    h = tokens.shape[0]
    if geom.canvas % h:
        raise ConfigError(f"a {h}x{h} token grid does not divide the {geom.canvas}-pixel canvas of this geometry")
    return h


def _content_tokens(tokens: np.ndarray, geom: Geometry, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """tokens (h, w, C) -> ((n, C) float32 content tokens in row-major order, (h, w) bool content mask)."""
    mask = geom.content_mask(grid=_grid(tokens, geom))
    x = np.asarray(tokens[mask], dtype=np.float32)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x, mask


def _fit(x: np.ndarray, k: int, seed: int, n_init: int) -> KMeans:
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if k > len(x):
        raise ConfigError(f"k = {k} clusters but only {len(x)} content tokens; choose a smaller k")
    if not np.isfinite(x).all():
        raise ConfigError("content tokens hold NaN or inf values; the feature store may be corrupt")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        # Fewer distinct tokens than k (e.g. a flat image) is legitimate; report it, don't fail.
        warnings.simplefilter("always", ConvergenceWarning)
        km.fit(x)
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            logger.warning("K-means: %s", w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return km


def _labels_grid(mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = np.full(mask.shape, PAD_LABEL, dtype=np.int16)
    out[mask] = labels
    return out


def _inertia(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    return float(((x - centroids[labels]) ** 2).sum(dtype=np.float64))


def cluster_image(
    tokens: np.ndarray, geom: Geometry, k: int, *, normalize: bool = True, seed: int = 0, n_init: int = 4
) -> ClusterResult:
    """K-means over one image's content patch tokens.

    tokens: (h, h, C), any float dtype, on the canvas described by ``geom`` (canvas = patch * h, the
    patch following from the two: 14 for DINOv2, 16 or 8 for other backbones).
    ``normalize`` L2-normalises each token first (cosine geometry, the usual choice for DINO tokens).
    """
    x, mask = _content_tokens(tokens, geom, normalize)
    km = _fit(x, k, seed, n_init)
    labels = km.labels_.astype(np.int64)
    centroids = km.cluster_centers_.astype(np.float32)
    return ClusterResult(_labels_grid(mask, labels), centroids, _inertia(x, labels, centroids))


def cluster_joint(
    tokens_list: Sequence[np.ndarray],
    geoms: Sequence[Geometry],
    k: int,
    *,
    normalize: bool = True,
    seed: int = 0,
    n_init: int = 4,
) -> list[ClusterResult]:
    """One K-means fitted on the content tokens of all images together (co-segmentation).

    Every result shares the same ``centroids``, so cluster ``c`` means the same thing in every image;
    each result's ``inertia`` is that image's share of the joint inertia.
    """
    if len(tokens_list) != len(geoms):
        raise ConfigError(f"got {len(tokens_list)} token arrays but {len(geoms)} geometries")
    if not tokens_list:
        raise ConfigError("cluster_joint needs at least one image")
    parts = [_content_tokens(t, g, normalize) for t, g in zip(tokens_list, geoms, strict=True)]
    x_all = np.concatenate([x for x, _ in parts])
    km = _fit(x_all, k, seed, n_init)
    centroids = km.cluster_centers_.astype(np.float32)
    labels_all = km.labels_.astype(np.int64)
    results, start = [], 0
    for x, mask in parts:
        labels = labels_all[start : start + len(x)]
        start += len(x)
        results.append(ClusterResult(_labels_grid(mask, labels), centroids, _inertia(x, labels, centroids)))
    return results


def to_original(labels: np.ndarray, geom: Geometry) -> np.ndarray:
    """(h, h) cluster map on the token grid -> (H, W) int16 at the original resolution (nearest)."""
    if labels.ndim != 2 or labels.shape[0] != labels.shape[1] or geom.canvas % labels.shape[0]:
        raise ConfigError(f"labels must be a square grid dividing the {geom.canvas}-pixel canvas, got {labels.shape}")
    values = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int16))
    return canvas_to_original(values, geom, mode="nearest").numpy()


def pca_rgb(tokens: np.ndarray, geom: Geometry, *, normalize: bool = False) -> np.ndarray:
    """The first 3 principal components of the content tokens as colours.

    tokens: (h, h, C). Returns (h, h, 3) float32 in [0, 1]: each component min-max scaled over the
    content patches; padding patches are black.
    """
    x, mask = _content_tokens(tokens, geom, normalize)
    if min(x.shape) < 3:
        raise ConfigError(f"PCA to 3 colours needs at least 3 content tokens and 3 channels, got {x.shape}")
    proj = PCA(n_components=3).fit_transform(x)
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    scaled = (proj - lo) / np.where(hi > lo, hi - lo, 1.0)
    out = np.zeros((*mask.shape, 3), dtype=np.float32)
    out[mask] = scaled
    return out


def pca_to_original(rgb: np.ndarray, geom: Geometry) -> np.ndarray:
    """(h, h, 3) PCA colours on the token grid -> (H, W, 3) float32 at the original resolution.

    Nearest neighbour, like :func:`to_original`, so the PCA panel shows the same patch grid as the
    cluster maps (bilinear would blend in the black padding at the borders).
    """
    values = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)
    return canvas_to_original(values, geom, mode="nearest").permute(1, 2, 0).numpy()


def hungarian_score(clusters: np.ndarray, gt: np.ndarray, num_classes: int) -> MatchResult:
    """Score a cluster map against ground truth under the best one-to-one cluster -> class matching.

    clusters: (H, W) int cluster ids (negative = no prediction). gt: (H, W) uint8 class ids, 255 ignored.
    The matching maximises the summed IoU over classes present in ``gt`` (Hungarian algorithm). A
    matched cluster predicts its class; unmatched clusters predict "void", so the ground-truth pixels
    they cover are false negatives and they are false positives for no class. Hence a matched pair's
    class IoU is the pair's IoU, unmatched present classes score 0, and ``miou`` averages over the
    classes present in ``gt``.
    """
    if clusters.shape != gt.shape:
        raise ConfigError(f"cluster map {clusters.shape} and ground truth {gt.shape} differ in shape")
    valid = gt != IGNORE
    g = gt[valid].astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= num_classes):
        raise LabelError(f"ground truth holds class ids outside [0, {num_classes}) other than {IGNORE}")
    per_class = np.full(num_classes, np.nan)
    classes = np.unique(g)
    if not classes.size:
        return MatchResult(float("nan"), {}, per_class)
    c = clusters[valid].astype(np.int64)
    ids = np.unique(c[c >= 0])
    inter = np.zeros((len(ids), len(classes)))
    has = c >= 0
    np.add.at(inter, (np.searchsorted(ids, c[has]), np.searchsorted(classes, g[has])), 1)
    area_c = np.array([(c == i).sum() for i in ids], dtype=np.float64)
    area_g = np.array([(g == j).sum() for j in classes], dtype=np.float64)
    iou = inter / (area_c[:, None] + area_g[None, :] - inter)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    per_class[classes] = 0.0
    mapping: dict[int, int] = {}
    for r, col in zip(rows, cols, strict=True):
        if iou[r, col] > 0:
            mapping[int(ids[r])] = int(classes[col])
            per_class[classes[col]] = iou[r, col]
    return MatchResult(float(np.nanmean(per_class)), mapping, per_class)


def dataset_shape_score(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> ShapeScore:
    """Mean over images of the per-image Hungarian mIoU of ``(clusters, gt)`` pairs.

    Each image gets its own matching, so this is a per-image average and NOT the split-level mIoU of
    the evaluator (one confusion matrix over all pixels of the split). Images without a labelled pixel
    are NaN in ``per_image`` and left out of the mean.
    """
    scores = []
    for clusters, gt in pairs:
        scores.append(hungarian_score(clusters, gt, num_classes).miou)
        if progress is not None:
            progress(1)
    finite = [s for s in scores if not np.isnan(s)]
    mean = float(np.mean(finite)) if finite else float("nan")
    return ShapeScore(mean, tuple(scores))
