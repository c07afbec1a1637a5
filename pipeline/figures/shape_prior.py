"""The K-means shape-prior figure of a feature store (``ssvt kmeans-viz``): cluster maps, centroids and scores.

For a few images of a store, K-means over each image's cached patch tokens (or one K-means over all of
them, ``joint``), mapped back to the original pixels and drawn next to the image, the PCA colours and
the ground truth. Everything needed to re-draw or re-score the figure is written next to it. Usage::

    store = FeatureStore.open("cache/dinov2_vitl14-448-last/val.zarr")
    res = kmeans_viz(store, Path("figures/kmeans"), KMeansVizConfig(ks=(3, 5), n=6), gt=ws.label_source("gt"))
    res.mean_scores      # {3: 0.58, 5: 0.63}: per-image Hungarian mIoU, averaged over the images

Files in ``out_dir``: ``kmeans.png``/``kmeans.pdf`` (the figure), ``maps/<id>_k<k>.npy`` ((H, W) int16
cluster ids, -1 = none) and ``maps/<id>_k<k>.png`` (palette PNG: index = cluster id, 255 = none, colours
as in the figure), ``centroids_k<k>.npy`` ((k, C) float32, joint) or ``centroids_k<k>.npz`` (id -> (k, C),
per image), ``scores.json`` (with ground truth) and ``kmeans.json`` (config, store and fingerprint).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import __version__
from pipeline.cache.geometry import IGNORE, Geometry
from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.names import ImageStatus
from pipeline.cache.store import FeatureStore
from pipeline.cache.voc import CLASS_NAMES
from pipeline.config import KMeansVizConfig
from pipeline.errors import ConfigError, DataError, LabelError, StoreError
from pipeline.features.data import load_rgb
from pipeline.figures.kmeans import (
    ClusterResult,
    cluster_image,
    cluster_joint,
    dataset_shape_score,
    pca_rgb,
    pca_to_original,
    to_original,
)
from pipeline.figures.plots import FigureRow, cluster_colors, kmeans_figure

logger = logging.getLogger(__name__)

#: Views of the store whose tokens come from the horizontally mirrored canvas (see ExtractConfig.views).
FLIPPED_VIEWS = ("hflip",)
#: Index of "no cluster" (padding) in the palette PNG maps.
PNG_NONE = IGNORE
FIGURE_STEM = "kmeans"


@dataclass(frozen=True)
class KMeansVizResult:
    """What :func:`kmeans_viz` drew and wrote.

    scores: id -> K -> per-image Hungarian mIoU (NaN when the mask has no labelled pixel), None
    without ground truth. mean_scores: K -> mean over the chosen images (NaN-skipping), or None.
    files: every file written, figures included.
    """

    out_dir: Path
    ids: tuple[str, ...]
    figures: tuple[Path, ...]
    scores: dict[str, dict[int, float]] | None
    mean_scores: dict[int, float] | None
    files: tuple[Path, ...]


def _check_gt(gt: LabelSource | None) -> None:
    if gt is not None:
        gt.require_dense("the K-means figure")


def choose_images(store: FeatureStore, cfg: KMeansVizConfig, gt: LabelSource | None = None) -> list[int]:
    """Store indices of the images to draw: ``cfg.ids`` in their order, else ``cfg.n`` drawn at random
    (``cfg.seed``) among images with status ok (and a mask in ``gt``), in store order."""
    _check_gt(gt)
    status = store.status()
    if cfg.ids is not None:
        index = {image_id: i for i, image_id in enumerate(store.ids)}
        unknown = [i for i in cfg.ids if i not in index]
        if unknown:
            raise ConfigError(
                f"{len(unknown)} id(s) not in {store.path}: {unknown[:5]}; valid ids are e.g. {store.ids[:5]} "
                f"({store.n_images} in all)"
            )
        chosen = [index[i] for i in cfg.ids]
        not_ok = [(store.ids[i], ImageStatus(int(status[i])).text) for i in chosen if status[i] != ImageStatus.OK]
        if not_ok:
            raise ConfigError(f"images without features in {store.path}: {not_ok[:5]}; run `ssvt extract` to finish the store")
        return chosen
    candidates = [int(i) for i in np.flatnonzero(status == ImageStatus.OK)]
    if gt is not None:
        reader = gt.reader(cfg.num_classes)
        candidates = [i for i in candidates if reader.has_mask(store.ids[i])]
    if not candidates:
        where = f" with a mask in {gt.path}" if gt is not None else ""
        raise StoreError(f"{store.path} has no extracted image{where} to draw; run `ssvt extract` or check the ids")
    if cfg.n > len(candidates):
        logger.warning("asked for %d images but only %d qualify; drawing all of them", cfg.n, len(candidates))
    rng = np.random.default_rng(cfg.seed)
    picked = rng.choice(len(candidates), size=min(cfg.n, len(candidates)), replace=False)
    return sorted(candidates[int(j)] for j in picked)


def _tokens(store: FeatureStore, index: int, view: int) -> np.ndarray:
    """(h, w, C) float16 tokens of one image, on the original (unmirrored) canvas."""
    tokens = store.read_tokens(index, index + 1, view=view)[0]
    if store.views[view] in FLIPPED_VIEWS:
        # The canvas is mirrored as a whole and the patch divides it, so mirroring the grid back is exact.
        tokens = np.ascontiguousarray(tokens[:, ::-1])
    return tokens


def original_image(store: FeatureStore, index: int, geom: Geometry) -> np.ndarray:
    """(H, W, 3) uint8 original image of store image ``index``, checked against its stored geometry."""
    if store.sources is None:
        raise StoreError(f"{store.path} does not record its image files (no 'sources'); extract it again with this ssvt")
    path = Path(store.sources[index])
    image = np.asarray(load_rgb(path))
    if image.shape[:2] != (geom.height, geom.width):
        raise DataError(
            f"image {path} is {image.shape[1]}x{image.shape[0]} but was {geom.width}x{geom.height} when its features "
            "were extracted; the file changed: extract again"
        )
    return image


def _mask(gt: LabelSource, image_id: str, geom: Geometry, num_classes: int) -> np.ndarray:
    """(H, W) uint8 ground truth of ``image_id``, 255 = void, at the original resolution."""
    found = gt.reader(num_classes).original(image_id, geom)
    if found is None:
        raise LabelError(f"no mask for image {image_id} in {gt.path} (label source {gt.name!r})")
    return found[1]


def _cluster(tokens: Sequence[np.ndarray], geoms: Sequence[Geometry], cfg: KMeansVizConfig) -> dict[int, list[ClusterResult]]:
    """K -> one ClusterResult per image (sharing centroids when ``cfg.joint``)."""
    opts: dict[str, Any] = {"normalize": cfg.normalize, "seed": cfg.seed, "n_init": cfg.n_init}
    if cfg.joint:
        return {k: cluster_joint(tokens, geoms, k, **opts) for k in cfg.ks}
    return {k: [cluster_image(t, g, k, **opts) for t, g in zip(tokens, geoms, strict=True)] for k in cfg.ks}


def _palette(n_colors: int) -> list[int]:
    """A 256-entry PIL palette: cluster c -> the figure's colour of c, the rest (255 = none) black."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:n_colors] = np.rint(cluster_colors(n_colors) * 255)
    return pal.flatten().tolist()


def _write_maps(folder: Path, image_id: str, maps: Mapping[int, np.ndarray], palette: list[int]) -> list[Path]:
    """``<id>_k<k>.npy`` ((H, W) int16) and ``<id>_k<k>.png`` (palette PNG) for every K."""
    written = []
    for k, labels in maps.items():
        npy, png = folder / f"{image_id}_k{k}.npy", folder / f"{image_id}_k{k}.png"
        np.save(npy, labels)
        img = Image.fromarray(np.where(labels >= 0, labels, PNG_NONE).astype(np.uint8), mode="P")
        img.putpalette(palette)
        img.save(png)
        written += [npy, png]
    return written


def _write_centroids(out_dir: Path, ids: Sequence[str], clusters: Mapping[int, list[ClusterResult]], joint: bool) -> list[Path]:
    written = []
    for k, results in clusters.items():
        if joint:
            path = out_dir / f"centroids_k{k}.npy"
            np.save(path, results[0].centroids)
        else:
            path = out_dir / f"centroids_k{k}.npz"
            arrays: dict[str, Any] = {i: r.centroids for i, r in zip(ids, results, strict=True)}
            np.savez(path, **arrays)
        written.append(path)
    return written


def _score(
    ids: Sequence[str], maps: Sequence[Mapping[int, np.ndarray]], masks: Sequence[np.ndarray], cfg: KMeansVizConfig
) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """Per-image Hungarian mIoU (id -> K -> mIoU) and its mean over the images per K."""
    per_image: dict[str, dict[int, float]] = {i: {} for i in ids}
    means: dict[int, float] = {}
    for k in cfg.ks:
        res = dataset_shape_score(((m[k], g) for m, g in zip(maps, masks, strict=True)), cfg.num_classes)
        means[k] = res.miou
        for image_id, value in zip(ids, res.per_image, strict=True):
            per_image[image_id][k] = value
    return per_image, means


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


def _record(store: FeatureStore, cfg: KMeansVizConfig, ids: Sequence[str], gt: LabelSource | None) -> dict[str, Any]:
    """The content of ``kmeans.json``: enough to re-draw the figure from the same store."""
    return {
        "config": cfg.to_dict(),
        "ids": list(ids),
        "store": str(store.path.resolve()),
        "store_fingerprint": store.fingerprint(),
        "backbone": store.backbone,
        "layers": store.layers,
        "size": store.size,
        "view": store.views[cfg.view],
        "gt": None if gt is None else {"name": gt.name, "kind": gt.kind, "path": str(gt.path)},
        "ssvt_version": __version__,
    }


@dataclass(frozen=True)
class _Inputs:
    """The chosen images: ids, geometries, tokens (h, w, C) float16, images (H, W, 3) uint8, masks (H, W) or empty."""

    ids: list[str]
    geoms: list[Geometry]
    tokens: list[np.ndarray]
    images: list[np.ndarray]
    masks: list[np.ndarray]


def _load(store: FeatureStore, chosen: Sequence[int], cfg: KMeansVizConfig, gt: LabelSource | None) -> _Inputs:
    all_geoms = store.geometries()
    data = _Inputs([store.ids[i] for i in chosen], [all_geoms[i] for i in chosen], [], [], [])
    for index, image_id, geom in zip(chosen, data.ids, data.geoms, strict=True):
        data.tokens.append(_tokens(store, index, cfg.view))
        data.images.append(original_image(store, index, geom))
        if gt is not None:
            data.masks.append(_mask(gt, image_id, geom, cfg.num_classes))
    return data


def _cluster_all(data: _Inputs, cfg: KMeansVizConfig, progress: Callable[[int], None] | None) -> dict[int, list[ClusterResult]]:
    """K -> one ClusterResult per chosen image, reporting progress per image (at the end when joint)."""
    if cfg.joint:
        clusters = _cluster(data.tokens, data.geoms, cfg)
        if progress is not None:
            progress(len(data.ids))
        return clusters
    clusters = {k: [] for k in cfg.ks}
    for j in range(len(data.ids)):
        for k, (res,) in _cluster(data.tokens[j : j + 1], data.geoms[j : j + 1], cfg).items():
            clusters[k].append(res)
        if progress is not None:
            progress(1)
    return clusters


def _write_scores(out_dir: Path, scores: Mapping[str, Mapping[int, float]], means: Mapping[int, float]) -> Path:
    payload = {
        "metric": "per-image Hungarian mIoU (clusters matched one-to-one to the classes present); null = no labelled pixel",
        "per_image": {i: {str(k): _num(v) for k, v in s.items()} for i, s in scores.items()},
        "mean": {str(k): _num(v) for k, v in means.items()},
    }
    logger.info("mean per-image mIoU: %s", {k: round(v, 3) for k, v in means.items()})
    return _write_json(out_dir / "scores.json", payload)


def kmeans_viz(
    store: FeatureStore,
    out_dir: Path,
    cfg: KMeansVizConfig,
    *,
    gt: LabelSource | None = None,
    progress: Callable[[int], None] | None = None,
) -> KMeansVizResult:
    """Cluster the chosen images' tokens for every K, draw the figure and write maps, centroids and scores.

    ``gt`` (a label source of kind mask) adds a ground-truth column and ``scores.json``. ``progress`` is
    called with the number of images just clustered (one by one; all at once in joint mode).
    """
    _check_gt(gt)
    if cfg.view >= store.n_views:
        raise ConfigError(f"view {cfg.view} out of range: {store.path} has views {store.views}")
    data = _load(store, choose_images(store, cfg, gt), cfg, gt)
    mode = "one K-means over all images" if cfg.joint else "K-means per image"
    logger.info("%s, K in %s, on %d images of %s", mode, cfg.ks, len(data.ids), store.path)
    clusters = _cluster_all(data, cfg, progress)
    maps = [{k: to_original(clusters[k][j].labels, g) for k in cfg.ks} for j, g in enumerate(data.geoms)]
    pcas = [pca_to_original(pca_rgb(t, g), g) if cfg.pca else None for t, g in zip(data.tokens, data.geoms, strict=True)]
    scores, means = _score(data.ids, maps, data.masks, cfg) if gt is not None else (None, None)
    rows = [
        FigureRow(i, image, m, pca=p, gt=data.masks[j] if gt is not None else None, score=None if scores is None else scores[i])
        for j, (i, image, m, p) in enumerate(zip(data.ids, data.images, maps, pcas, strict=True))
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    names = CLASS_NAMES if cfg.num_classes <= len(CLASS_NAMES) else [str(c) for c in range(cfg.num_classes)]
    random = " (random init)" if str(store.attrs.get("weights_source", "")).startswith("random") else ""
    layers = ",".join(map(str, store.layers))
    title = f"{store.backbone}{random} tokens, layer {layers}, {store.size} px, {mode}"
    figures = kmeans_figure(
        rows, cfg.ks, out_dir / FIGURE_STEM, show_pca=cfg.pca, show_gt=gt is not None, class_names=names, title=title, dpi=cfg.dpi
    )
    files = [*figures, *_write_outputs(out_dir, data.ids, maps, clusters, cfg)]
    if scores is not None and means is not None:
        files.append(_write_scores(out_dir, scores, means))
    record = {**_record(store, cfg, data.ids, gt), "files": [str(p.relative_to(out_dir)) for p in files]}
    files.append(_write_json(out_dir / "kmeans.json", record))
    return KMeansVizResult(out_dir, tuple(data.ids), tuple(figures), scores, means, tuple(files))


def _write_outputs(
    out_dir: Path,
    ids: Sequence[str],
    maps: Sequence[Mapping[int, np.ndarray]],
    clusters: Mapping[int, list[ClusterResult]],
    cfg: KMeansVizConfig,
) -> list[Path]:
    """Cluster maps (npy + palette PNG, coloured like the figure) and centroids."""
    folder = out_dir / "maps"
    folder.mkdir(parents=True, exist_ok=True)
    # The figure colours cluster c with cluster_colors(n)[c], n = the largest id drawn + 1; the same here.
    n_colors = max(1, max(int(m[k].max()) + 1 for m in maps for k in cfg.ks))
    palette = _palette(n_colors)
    written = []
    for image_id, m in zip(ids, maps, strict=True):
        written += _write_maps(folder, image_id, m, palette)
    return [*written, *_write_centroids(out_dir, ids, clusters, cfg.joint)]
