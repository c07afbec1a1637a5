"""Pictures of predictions: a class-colour overlay with a legend strip, and a grid of the worst images.

:func:`overlay` draws with PIL only (no matplotlib), so it is fast enough for every image of a split;
:func:`worst_figure` draws a matplotlib grid like the other figures. Usage::

    overlay(image, pred, CLASS_NAMES).save("out/overlays/2007_000032.png")  # image + legend strip below
    row = WorstRow("2007_000032", image, gt, pred, iou=0.41)
    worst_figure([row], Path("out/worst.png"), title="worst images by IoU")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.cache.geometry import IGNORE
from pipeline.cache.voc import CLASS_NAMES, palette
from pipeline.config import DPI
from pipeline.errors import ConfigError
from pipeline.figures.plots import LEGEND_IN, PANEL_IN, TITLE_IN, _class_name, _legend, _new_figure, _show

logger = logging.getLogger(__name__)

#: Legend strip of :func:`overlay`, in pixels: a SWATCH_PX square and the name per class, entries
#: PAD_PX apart, on a white band below the image (wrapped onto more lines when the image is narrow).
SWATCH_PX = 12
PAD_PX = 4
BAND_RGB = (255, 255, 255)
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def legend_entries(pred: np.ndarray, class_names: Sequence[str]) -> list[tuple[int, str]]:
    """(class id, name) of every id present in ``pred``, sorted by id; 255 is named "void" (and last)."""
    ids = np.unique(np.asarray(pred)).tolist()
    return [(c, "void" if c == IGNORE else _class_name(c, class_names)) for c in ids]


def _check_overlay(image: np.ndarray, pred: np.ndarray, alpha: float) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ConfigError(f"overlay: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if pred.shape != image.shape[:2]:
        raise ConfigError(f"overlay: prediction is {pred.shape} but the image is {image.shape}; they must be the same H, W")
    if not np.issubdtype(pred.dtype, np.integer) or (pred.size and (pred.min() < 0 or pred.max() > 255)):
        raise ConfigError(f"overlay: prediction must hold class ids in [0, 255], got dtype {pred.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"overlay: alpha must lie in [0, 1], got {alpha}")


def _blend(image: np.ndarray, pred: np.ndarray, alpha: float) -> np.ndarray:
    """(H, W, 3) uint8: ``rint((1 - alpha) * image + alpha * palette()[pred])`` where pred != 0;
    background (class 0) pixels are left as they are. See :func:`overlay`."""
    ids = pred.astype(np.intp)
    mixed = (1.0 - alpha) * image.astype(np.float64) + alpha * palette()[ids].astype(np.float64)
    return np.where((ids != 0)[..., None], np.rint(mixed), image).astype(np.uint8)


@lru_cache(maxsize=1)
def _font() -> Font:
    return ImageFont.load_default()


def _layout(entries: Sequence[tuple[int, str]], width: int, font: Font) -> tuple[list[tuple[int, int]], int, int]:
    """Top-left corner of each entry in the band, the band's height and the width it needs (>= ``width``)."""
    line = max(SWATCH_PX, int(font.getbbox("Ag")[3])) + PAD_PX
    x, y, need = PAD_PX, PAD_PX, width
    corners: list[tuple[int, int]] = []
    for _, name in entries:
        w = SWATCH_PX + PAD_PX + int(font.getbbox(name)[2]) + 2 * PAD_PX
        if x > PAD_PX and x + w > width:
            x, y = PAD_PX, y + line
        corners.append((x, y))
        need = max(need, x + w)
        x += w
    return corners, (y + line if entries else 0), need


def overlay(image: np.ndarray, pred: np.ndarray, class_names: Sequence[str], *, alpha: float = 0.5) -> Image.Image:
    """The image tinted with the VOC colour of each pixel's predicted class, over a legend strip.

    image: (H, W, 3) uint8. pred: (H, W) integer class ids, 255 = void. Every pixel of a class other
    than 0 becomes ``rint((1 - alpha) * image + alpha * palette()[class])`` (void: the palette's void
    colour); background (class 0) pixels stay as they are, since its VOC colour is black and would only
    darken the picture. The result keeps the image at the top left, unscaled, with a white band below
    listing :func:`legend_entries` (background's swatch is drawn hollow: it is not tinted). The band
    wraps onto more lines when the image is narrow, and the canvas widens if a single entry needs it.
    """
    image, pred = np.asarray(image), np.asarray(pred)
    _check_overlay(image, pred, alpha)
    h, w = pred.shape
    entries = legend_entries(pred, class_names)
    font = _font()
    corners, band, width = _layout(entries, w, font)
    out = Image.new("RGB", (width, h + band), BAND_RGB)
    out.paste(Image.fromarray(_blend(image, pred, alpha)), (0, 0))
    draw = ImageDraw.Draw(out)
    pal = palette()
    for (c, name), (x, y) in zip(entries, corners, strict=True):
        box = (x, h + y, x + SWATCH_PX - 1, h + y + SWATCH_PX - 1)
        draw.rectangle(box, fill=None if c == 0 else tuple(int(v) for v in pal[c]), outline=(80, 80, 80))
        draw.text((x + SWATCH_PX + PAD_PX, h + y), name, fill=(0, 0, 0), font=font)
    return out


@dataclass(frozen=True)
class WorstRow:
    """One image of :func:`worst_figure`.

    image: (H, W, 3) uint8. gt, pred: (H, W) uint8 class ids, 255 = void. iou: the image's IoU in
    [0, 1] (shown in %), or None.
    """

    id: str
    image: np.ndarray
    gt: np.ndarray
    pred: np.ndarray
    iou: float | None = None


def _check_worst_row(row: WorstRow) -> None:
    if row.image.ndim != 3 or row.image.shape[2] != 3:
        raise ConfigError(f"image {row.id}: expected (H, W, 3), got {row.image.shape}")
    hw = row.image.shape[:2]
    for what, mask in (("ground truth", row.gt), ("prediction", row.pred)):
        if mask.shape != hw:
            raise ConfigError(f"image {row.id}: {what} is {mask.shape}, not the image's {hw}")


def worst_figure(
    rows: Sequence[WorstRow],
    path: Path,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    title: str | None = None,
    dpi: int = DPI,
) -> Path:
    """Write a PNG grid at ``path`` (parents created) and return it: one row per image, with the image
    (titled with its id and IoU in %), the ground truth and the prediction in VOC colours (void in the
    palette's void colour), and a legend of the classes in that row's ground truth and prediction.
    Panels are PANEL_IN wide and as high as the image's aspect needs, as in :func:`kmeans_figure`."""
    if path.suffix.lower() != ".png":
        raise ConfigError(f"worst_figure writes PNG only: give a path ending in .png, got {path.name!r}")
    if not rows:
        raise ConfigError("worst_figure needs at least one row, got none")
    for row in rows:
        _check_worst_row(row)
    row_heights = [PANEL_IN * float(np.clip(r.image.shape[0] / r.image.shape[1], 0.5, 2.0)) + TITLE_IN for r in rows]
    fig = _new_figure(3 * PANEL_IN + LEGEND_IN, sum(row_heights) + (TITLE_IN if title else 0.0), dpi)
    axes = fig.subplots(len(rows), 3, squeeze=False, height_ratios=row_heights)
    pal = palette()
    for (ax_img, ax_gt, ax_pred), row in zip(axes, rows, strict=True):
        iou = "" if row.iou is None else f"  IoU {100 * row.iou:.1f} %"
        _show(ax_img, row.image, f"{row.id}{iou}")
        _show(ax_gt, pal[np.asarray(row.gt)], "ground truth")
        _show(ax_pred, pal[np.asarray(row.pred)], "prediction")
        _legend(ax_pred, [np.asarray(row.gt), np.asarray(row.pred)], class_names, "void")
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    logger.info("wrote %s", path)
    return path
