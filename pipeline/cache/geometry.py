"""Where an original image sits on the square model canvas (numpy only; the torch resampling that
uses it is :mod:`pipeline.resample`).

Every image is resized (aspect kept) so that its longer side is ``size`` and padded, centred, to a
``size x size`` canvas, so every image gives the same ``(size/patch) x (size/patch)`` token grid,
``patch`` being the backbone's patch size (:func:`check_size`). The per-image :class:`Geometry` is
stored next to the features so that later stages can map canvas predictions back to original pixels::

    geom = fit_geometry(height=375, width=500, size=448)
    canvas = mask_to_canvas(mask, geom)            # (448, 448) uint8, padding = 255
    xy = points_to_canvas(clicks, geom)            # (n, 2) canvas coordinates
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.errors import ConfigError

IGNORE = 255
#: DINOv2's patch size: the patch of feature stores written before their ``patch`` attribute
#: (cache_layout.md), and of new ones whose creator names none. A canvas's patch comes from its
#: backbone (``Backbone.patch_size``), not from here.
PATCH = 14

#: Column order of the per-image ``geometry`` array in the feature store (see cache_layout.md).
GEOMETRY_COLUMNS = ("height", "width", "resized_height", "resized_width", "pad_top", "pad_left")


@dataclass(frozen=True)
class Geometry:
    """An original ``height x width`` image resized to ``resized_*`` and placed on a square canvas.

    The content occupies canvas rows ``pad_top : pad_top + resized_height`` and columns
    ``pad_left : pad_left + resized_width``; everything else is padding.
    """

    height: int
    width: int
    resized_height: int
    resized_width: int
    pad_top: int
    pad_left: int
    canvas: int

    @property
    def scale(self) -> float:
        """Canvas pixels per original pixel (the same on both axes up to rounding)."""
        return self.canvas / max(self.height, self.width)

    def to_row(self) -> np.ndarray:
        """The store's int32 row, in :data:`GEOMETRY_COLUMNS` order."""
        return np.array(
            [self.height, self.width, self.resized_height, self.resized_width, self.pad_top, self.pad_left],
            dtype=np.int32,
        )

    @classmethod
    def from_row(cls, row: np.ndarray, canvas: int) -> Geometry:
        h, w, rh, rw, top, left = (int(v) for v in row)
        return cls(h, w, rh, rw, top, left, canvas)

    def content_mask(self, grid: int | None = None) -> np.ndarray:
        """(S, S) bool, True on content pixels; with ``grid``, (grid, grid) True on patches that
        overlap the content at all (a patch is padding only if it holds no content pixel)."""
        s = self.canvas
        mask = np.zeros((s, s), dtype=bool)
        mask[self.pad_top : self.pad_top + self.resized_height, self.pad_left : self.pad_left + self.resized_width] = True
        if grid is None:
            return mask
        p = s // grid
        return np.asarray(mask.reshape(grid, p, grid, p).any(axis=(1, 3)))


def check_size(size: int, patch: int, model: str | None = None) -> int:
    """``size``, if a canvas of that side fits a backbone of patch ``patch`` (named ``model`` in the error)."""
    if size <= 0 or size % patch:
        of, near = f" of {model}" if model else "", max(patch, round(size / patch) * patch)
        raise ConfigError(f"size must be a multiple of the patch size {patch}{of}, got {size} (try {near})")
    return size


def fit_geometry(height: int, width: int, size: int) -> Geometry:
    """The geometry of an ``height x width`` image on a ``size x size`` canvas, longer side = size.

    Any positive size: the geometry does not depend on the patch; whoever feeds the canvas to a backbone
    checks ``size`` against its patch with :func:`check_size`."""
    if size <= 0:
        raise ConfigError(f"canvas size must be positive, got {size}")
    if height <= 0 or width <= 0:
        raise ConfigError(f"image size must be positive, got {height}x{width}")
    scale = size / max(height, width)
    rh = min(size, max(1, round(height * scale)))
    rw = min(size, max(1, round(width * scale)))
    return Geometry(height, width, rh, rw, (size - rh) // 2, (size - rw) // 2, size)


def mask_to_canvas(mask: np.ndarray, geom: Geometry) -> np.ndarray:
    """(H, W) uint8 class ids -> (S, S) uint8 by nearest neighbour, padding = 255."""
    if mask.shape != (geom.height, geom.width):
        raise ConfigError(f"mask is {mask.shape[0]}x{mask.shape[1]} but the image is {geom.height}x{geom.width}")
    resized = Image.fromarray(mask).resize((geom.resized_width, geom.resized_height), Image.Resampling.NEAREST)
    out = np.full((geom.canvas, geom.canvas), IGNORE, dtype=np.uint8)
    out[geom.pad_top : geom.pad_top + geom.resized_height, geom.pad_left : geom.pad_left + geom.resized_width] = np.asarray(
        resized
    )
    return out


def points_to_canvas(xy: np.ndarray, geom: Geometry) -> np.ndarray:
    """(n, 2) original pixel coordinates (x, y; pixel centres at integers) -> (n, 2) float canvas
    coordinates, by the same mapping the image resize uses (pixel-centre aligned)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    sx = geom.resized_width / geom.width
    sy = geom.resized_height / geom.height
    x = (xy[:, 0] + 0.5) * sx - 0.5 + geom.pad_left
    y = (xy[:, 1] + 0.5) * sy - 0.5 + geom.pad_top
    return np.stack([x, y], axis=1)
