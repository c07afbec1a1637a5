"""Torch resampling between original images and the square model canvas.

The geometry itself (where the content sits, the stored per-image rows) is numpy-only and lives in
:mod:`pipeline.cache.geometry`; this module moves pixels and logits along it, for both stages::

    pixels = image_to_canvas(pil_image, geom, mean, std)   # (3, S, S) float32, stage one
    logits = canvas_to_original(patch_logits, geom)        # (K, H, W), evaluation and figures
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.cache.geometry import Geometry


def image_to_canvas(image: Image.Image, geom: Geometry, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """An RGB PIL image -> (3, S, S) float32, normalised, padding = 0 (the mean colour).

    Resizing is bicubic with PIL's antialiasing, as in torchvision's ``Resize`` on PIL images.
    """
    resized = image.resize((geom.resized_width, geom.resized_height), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    arr = (arr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    out = torch.zeros(3, geom.canvas, geom.canvas)
    out[:, geom.pad_top : geom.pad_top + geom.resized_height, geom.pad_left : geom.pad_left + geom.resized_width] = arr
    return out


def canvas_to_original(values: torch.Tensor, geom: Geometry, mode: str = "bilinear") -> torch.Tensor:
    """(..., h, w) values on the canvas (any resolution, e.g. the token grid or S x S) ->
    (..., H, W) on the original image: upsample to the canvas, drop the padding, resize to H x W.

    ``mode`` is "bilinear" for logits/scores and "nearest" for class maps.
    """
    lead = values.shape[:-2]
    x = values.reshape(-1, 1, *values.shape[-2:]) if values.dim() == 2 else values.reshape(1, -1, *values.shape[-2:])
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    if mode == "nearest":
        mode = "nearest-exact"  # pixel-centre aligned, like PIL's NEAREST used for the masks
    dtype = x.dtype
    if not x.is_floating_point():
        x = x.float()
    s = geom.canvas
    if x.shape[-2:] != (s, s):
        x = F.interpolate(x, size=(s, s), mode=mode, **kwargs)
    x = x[..., geom.pad_top : geom.pad_top + geom.resized_height, geom.pad_left : geom.pad_left + geom.resized_width]
    x = F.interpolate(x, size=(geom.height, geom.width), mode=mode, **kwargs)
    return x.to(dtype).reshape(*lead, geom.height, geom.width)
