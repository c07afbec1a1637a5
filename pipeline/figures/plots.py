"""Figures: the K-means shape-prior grid, class activation maps, a confusion matrix heatmap and training curves.

Everything draws on a fresh :class:`matplotlib.figure.Figure` with an Agg canvas, so no global pyplot
state is touched and importing this module has no side effects. Usage::

    row = FigureRow("2007_000032", image, {3: clusters3, 5: clusters5}, gt=mask, score={3: 0.61, 5: 0.72})
    kmeans_figure([row], [3, 5], Path("out/kmeans"), show_pca=False, show_gt=True)  # kmeans.png + .pdf
    cam_figure([CamRow("2007_000032", image, [(1, cam)], pseudo_mask, gt=mask)], Path("out/cam"))  # cam.png + .pdf
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipeline.cache.geometry import IGNORE
from pipeline.cache.voc import CLASS_NAMES, palette
from pipeline.config import DPI
from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)

#: Layout of :func:`kmeans_figure`, in inches: a panel is PANEL_IN wide and PANEL_IN * aspect high
#: (aspect = that row's H / W, clipped to [0.5, 2]); each row and the figure title get TITLE_IN
#: above; the ground-truth legend gets LEGEND_IN on the right.
PANEL_IN = 2.0
TITLE_IN = 0.4
LEGEND_IN = 1.4


@dataclass(frozen=True)
class FigureRow:
    """One image of the K-means figure.

    image: (H, W, 3) uint8. cluster_maps: K -> (H, W) int cluster ids (negative = none, drawn black).
    pca: (H, W, 3) float in [0, 1] or None. gt: (H, W) uint8 class ids, 255 = void, or None.
    score: K -> Hungarian mIoU of that cluster map, shown in the panel title, or None.
    """

    image_id: str
    image: np.ndarray
    cluster_maps: Mapping[int, np.ndarray]
    pca: np.ndarray | None = None
    gt: np.ndarray | None = None
    score: Mapping[int, float] | None = None


def _new_figure(width: float, height: float, dpi: int) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def cluster_colors(n: int) -> np.ndarray:
    """(n, 3) float RGB: tab10 for up to 10 clusters, else tab20 (repeating beyond 20)."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    base = cmap(np.arange(cmap.N))[:, :3]
    if n > len(base):
        logger.warning("%d clusters but only %d distinct colours; colours repeat", n, len(base))
    return base[np.arange(n) % len(base)]


def colorize_clusters(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """(H, W) int cluster ids -> (H, W, 3) float RGB, cluster c = ``colors[c]``, negative ids black."""
    out = np.zeros((*labels.shape, 3))
    valid = labels >= 0
    out[valid] = colors[labels[valid] % len(colors)]
    return out


def _check_row(row: FigureRow, ks: Sequence[int], show_pca: bool, show_gt: bool) -> None:
    if row.image.ndim != 3 or row.image.shape[2] != 3:
        raise ConfigError(f"image {row.image_id}: expected (H, W, 3), got {row.image.shape}")
    hw = row.image.shape[:2]
    for k in ks:
        if k not in row.cluster_maps:
            raise ConfigError(f"image {row.image_id}: no cluster map for K = {k} (have {sorted(row.cluster_maps)})")
        if row.cluster_maps[k].shape != hw:
            raise ConfigError(f"image {row.image_id}: cluster map {row.cluster_maps[k].shape} is not {hw}")
    if show_pca and (row.pca is None or row.pca.shape != (*hw, 3)):
        shape = None if row.pca is None else row.pca.shape
        raise ConfigError(f"image {row.image_id}: show_pca needs a (H, W, 3) PCA map of {hw}, got {shape}")
    if show_gt and (row.gt is None or row.gt.shape != hw):
        shape = None if row.gt is None else row.gt.shape
        raise ConfigError(f"image {row.image_id}: show_gt needs a ground-truth mask of {hw}, got {shape}")


def _show(ax: Axes, rgb: np.ndarray, title: str) -> None:
    ax.imshow(rgb, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def _class_name(c: int, class_names: Sequence[str]) -> str:
    return class_names[c] if c < len(class_names) else str(c)


def _legend(ax: Axes, masks: Sequence[np.ndarray], class_names: Sequence[str], void: str) -> None:
    """A legend right of ``ax``: the VOC colour of every class in ``masks``, then 255 as ``void``."""
    pal = palette() / 255.0
    values = np.unique(np.concatenate([np.unique(m) for m in masks]))
    handles = [Patch(facecolor=pal[c], edgecolor="0.3", label=_class_name(int(c), class_names)) for c in values if c != IGNORE]
    if IGNORE in values:
        handles.append(Patch(facecolor=pal[IGNORE], edgecolor="0.3", label=void))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=6, frameon=False)


def _gt_panel(ax: Axes, gt: np.ndarray, class_names: Sequence[str]) -> None:
    _show(ax, palette()[gt], "ground truth")
    _legend(ax, [gt], class_names, "void")


def kmeans_figure(
    rows: Sequence[FigureRow],
    ks: Sequence[int],
    out_stem: Path,
    *,
    show_pca: bool,
    show_gt: bool,
    class_names: Sequence[str] = CLASS_NAMES,
    title: str | None = None,
    dpi: int = DPI,
) -> list[Path]:
    """Draw the K-means grid and write ``<out_stem>.png`` and ``<out_stem>.pdf``; returns both paths.

    One row per image; columns: the image, one cluster map per K ("K = k", with the mIoU when the row
    has a score), then optionally the PCA colours and the ground truth with a legend of its classes.
    Cluster c has the same colour in every panel, so jointly clustered rows are directly comparable.
    The PNG is ``(ncols * PANEL_IN [+ LEGEND_IN]) * dpi`` wide; each row is as high as its image's
    aspect needs (see the layout constants).
    """
    if not rows or not ks:
        raise ConfigError(f"kmeans_figure needs at least one row and one K, got {len(rows)} rows and ks={list(ks)}")
    for row in rows:
        _check_row(row, ks, show_pca, show_gt)
    n_clusters = max(int(row.cluster_maps[k].max()) + 1 for row in rows for k in ks)
    colors = cluster_colors(max(n_clusters, 1))
    ncols = 1 + len(ks) + int(show_pca) + int(show_gt)
    row_heights = [PANEL_IN * float(np.clip(r.image.shape[0] / r.image.shape[1], 0.5, 2.0)) + TITLE_IN for r in rows]
    width = ncols * PANEL_IN + (LEGEND_IN if show_gt else 0.0)
    height = sum(row_heights) + (TITLE_IN if title else 0.0)
    fig = _new_figure(width, height, dpi)
    axes = fig.subplots(len(rows), ncols, squeeze=False, height_ratios=row_heights)
    for ax_row, row in zip(axes, rows, strict=True):
        _show(ax_row[0], row.image, row.image_id)
        for ax, k in zip(ax_row[1:], ks, strict=False):
            label = f"K = {k}"
            if row.score is not None and k in row.score:
                label += f"  (mIoU {row.score[k]:.2f})"
            _show(ax, colorize_clusters(np.asarray(row.cluster_maps[k]), colors), label)
        col = 1 + len(ks)
        if show_pca and row.pca is not None:  # not None: checked by _check_row
            _show(ax_row[col], np.clip(row.pca, 0.0, 1.0), "PCA (3 components)")
            col += 1
        if show_gt and row.gt is not None:
            _gt_panel(ax_row[col], np.asarray(row.gt), class_names)
    if title:
        fig.suptitle(title, fontsize=10)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.parent / f"{out_stem.name}.png", out_stem.parent / f"{out_stem.name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=dpi)
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths


#: CAM panels of :func:`cam_figure`: the class map as a heat map (0 blue, 1 red) over the image.
CAM_CMAP = "jet"
CAM_ALPHA = 0.5


@dataclass(frozen=True)
class CamRow:
    """One image of the class-activation-map figure.

    image: (H, W, 3) uint8. cams: (class id, (H, W) float map in [0, 1]) for each class the image is
    labelled with. mask: (H, W) uint8 pseudo-mask, 255 = unlabelled. gt: (H, W) uint8, 255 = void, or None.
    """

    image_id: str
    image: np.ndarray
    cams: Sequence[tuple[int, np.ndarray]]
    mask: np.ndarray
    gt: np.ndarray | None = None


def _check_cam_row(row: CamRow) -> None:
    if row.image.ndim != 3 or row.image.shape[2] != 3:
        raise ConfigError(f"image {row.image_id}: expected (H, W, 3), got {row.image.shape}")
    hw = row.image.shape[:2]
    for c, cam in row.cams:
        if cam.shape != hw:
            raise ConfigError(f"image {row.image_id}: CAM of class {c} is {cam.shape}, not the image's {hw}")
        if not np.isfinite(cam).all() or cam.min() < -1e-3 or cam.max() > 1 + 1e-3:
            raise ConfigError(f"image {row.image_id}: CAM of class {c} must lie in [0, 1], got [{cam.min()}, {cam.max()}]")
    if row.mask.shape != hw:
        raise ConfigError(f"image {row.image_id}: pseudo-mask is {row.mask.shape}, not the image's {hw}")
    if row.gt is not None and row.gt.shape != hw:
        raise ConfigError(f"image {row.image_id}: ground truth is {row.gt.shape}, not the image's {hw}")


def _cam_panel(ax: Axes, image: np.ndarray, cam: np.ndarray, title: str, threshold: float | None) -> None:
    _show(ax, image, title)
    ax.imshow(cam, cmap=CAM_CMAP, vmin=0.0, vmax=1.0, alpha=CAM_ALPHA, interpolation="bilinear")
    if threshold is not None and cam.min() < threshold < cam.max():
        ax.contour(cam, levels=[threshold], colors="white", linewidths=0.8)


def cam_figure(
    rows: Sequence[CamRow],
    out_stem: Path,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    threshold: float | None = None,
    title: str | None = None,
    dpi: int = DPI,
) -> tuple[Path, Path]:
    """Draw class activation maps and pseudo-masks; write ``<out_stem>.png`` and ``<out_stem>.pdf``.

    One row per image: the image, one CAM per labelled class (a ``CAM_CMAP`` heat map over the image,
    titled with the class; with ``threshold``, a white line where the map crosses it), blank panels up
    to the row with the most CAMs, the pseudo-mask and, when any row has one, the ground truth, then a
    legend of the row's classes. Masks use the VOC colours; 255 (unlabelled, void) is the VOC void colour.
    The PNG is ``(ncols * PANEL_IN + LEGEND_IN) * dpi`` wide, rows as high as :func:`kmeans_figure`'s.
    """
    if not rows:
        raise ConfigError("cam_figure needs at least one row")
    for row in rows:
        _check_cam_row(row)
    n_cams = max(len(row.cams) for row in rows)
    show_gt = any(row.gt is not None for row in rows)
    ncols = 2 + n_cams + int(show_gt)
    row_heights = [PANEL_IN * float(np.clip(r.image.shape[0] / r.image.shape[1], 0.5, 2.0)) + TITLE_IN for r in rows]
    fig = _new_figure(ncols * PANEL_IN + LEGEND_IN, sum(row_heights) + (TITLE_IN if title else 0.0), dpi)
    axes = fig.subplots(len(rows), ncols, squeeze=False, height_ratios=row_heights)
    for ax_row, row in zip(axes, rows, strict=True):
        _show(ax_row[0], row.image, row.image_id)
        for ax, (c, cam) in zip(ax_row[1:], row.cams, strict=False):
            _cam_panel(ax, row.image, np.asarray(cam, dtype=np.float32), _class_name(int(c), class_names), threshold)
        for ax in ax_row[1 + len(row.cams) : 1 + n_cams]:
            ax.set_axis_off()
        mask_ax = ax_row[1 + n_cams]
        _show(mask_ax, palette()[row.mask], "pseudo-mask")
        masks, void = [row.mask], "unlabelled"
        if show_gt:
            if row.gt is None:
                ax_row[-1].set_axis_off()
            else:
                _show(ax_row[-1], palette()[row.gt], "ground truth")
                masks, void = [row.mask, row.gt], "unlabelled / void"
        _legend(ax_row[-1], masks, class_names, void)
    if title:
        fig.suptitle(title, fontsize=10)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = out_stem.parent / f"{out_stem.name}.png", out_stem.parent / f"{out_stem.name}.pdf"
    for path in (png, pdf):
        fig.savefig(path, dpi=dpi)
    logger.info("wrote %s, %s", png, pdf)
    return png, pdf


def row_normalize(matrix: np.ndarray) -> np.ndarray:
    """(K, K) counts (rows = ground truth) -> rows summing to 1; rows without pixels are NaN."""
    m = np.asarray(matrix, dtype=np.float64)
    sums = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums > 0, m / sums, np.nan)


def confusion_figure(
    matrix: np.ndarray, class_names: Sequence[str], path: Path, *, title: str | None = None, dpi: int = DPI
) -> Path:
    """Heatmap of a (K, K) confusion matrix (rows = ground truth, columns = prediction), normalised per
    row, so the diagonal is each class's recall. Classes absent from the ground truth are grey."""
    m = np.asarray(matrix)
    k = len(class_names)
    if m.shape != (k, k):
        raise ConfigError(f"confusion matrix is {m.shape} but there are {k} class names")
    norm = np.ma.masked_invalid(row_normalize(m))
    side = 2.5 + 0.32 * k
    fig = _new_figure(side + 1.0, side, dpi)
    ax = fig.subplots()
    cmap = colormaps["Blues"].with_extremes(bad="0.85")
    im = ax.imshow(norm, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(k), labels=list(class_names), rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels=list(class_names), fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    for i, j in zip(*np.nonzero(~np.ma.getmaskarray(norm)), strict=True):
        v = norm[i, j]
        if v >= 0.005:
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=5, color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the row's pixels")
    if title:
        ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def curve_figure(history: Mapping[str, Sequence[float]], path: Path, *, title: str | None = None, dpi: int = DPI) -> Path:
    """Training curves: one panel per series in ``history`` (e.g. "loss", "lr"), stacked, against
    ``history["step"]`` when it is given and as long as the series, else against the entry index."""
    series = {name: np.asarray(v, dtype=np.float64) for name, v in history.items() if name != "step" and len(v)}
    if not series:
        raise ConfigError(f"history holds no series to plot (keys: {sorted(history)})")
    steps = np.asarray(history.get("step", []), dtype=np.float64)
    fig = _new_figure(6.0, 0.6 + 1.8 * len(series), dpi)
    axes = fig.subplots(len(series), 1, squeeze=False)[:, 0]
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        x = steps if len(steps) == len(values) else np.arange(len(values))
        ax.plot(x, values, lw=1.0)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
