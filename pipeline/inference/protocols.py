"""The official DINOv2 test pipelines ("lin" and "+ms") as data, and their geometry.

Every number comes from the official mmseg configs (``dinov2_vit*14_voc2012_linear_config.py`` and
``..._ms_config.py``; README "Comparing with published numbers")::

    proto = PROTOCOLS["lin"]
    rescaled_size(375, 500, proto.scale)        # (512, 683): short side 512, as mmcv.imrescale
    window_boxes(512, 683, proto.crop, proto.stride)   # [(0, 512, 0, 512), (0, 512, 171, 683)]

The rules, as mmseg 0.x applies them:

- ``MultiScaleFlipAug`` turns ``img_scale`` (long cap, short side) and each ratio r into the scale
  ``(int(long * r), int(short * r))``; ``Resize(keep_ratio=True)`` rescales by
  ``min(long / max(h, w), short / min(h, w))`` and rounds each side with ``int(x * f + 0.5)``.
- ``slide_inference`` cuts windows of ``crop`` with ``stride``; the last row and column of windows
  are shifted back to end at the border; windows never exceed the image. Each window's logits are
  resized (bilinear, ``align_corners=False``) to the window, summed, and divided by the number of
  windows covering each pixel; the sum is resized to the original image and turned into softmax
  probabilities, which are averaged over scales and flips.
- The backbone pads each window, centred, to a multiple of the patch size (``CenterPadding``); the
  logits of the padded grid are resized to the unpadded window, as the official code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError

#: The store-based proxy: one cached canvas (longer side = store size, padded square) per image.
CACHE = "cache"


@dataclass(frozen=True)
class Protocol:
    """One test pipeline: rescale to ``scale`` x each ratio, optionally flip, slide ``crop`` windows."""

    name: str
    scale: tuple[int, int]  # (long-side cap, short side), mmseg's img_scale
    ratios: tuple[float, ...]
    flip: bool
    crop: int
    stride: int
    description: str = ""

    def __post_init__(self) -> None:
        if not self.ratios or min(self.ratios) <= 0:
            raise ConfigError(f"protocol {self.name!r}: ratios must be positive, got {self.ratios}")
        if self.crop <= 0 or not 0 < self.stride <= self.crop:
            raise ConfigError(f"protocol {self.name!r}: need 0 < stride <= crop, got crop {self.crop}, stride {self.stride}")

    @property
    def views(self) -> list[tuple[float, bool]]:
        """(ratio, flipped) of every augmented view, in the order mmseg's MultiScaleFlipAug makes them."""
        return [(r, f) for r in self.ratios for f in ((False, True) if self.flip else (False,))]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "scale": list(self.scale), "ratios": list(self.ratios), "flip": self.flip,
                "crop": self.crop, "stride": self.stride}  # fmt: skip


PROTOCOLS: dict[str, Protocol] = {
    "lin": Protocol(
        "lin", scale=(2048, 512), ratios=(1.0,), flip=False, crop=512, stride=341,
        description="DINOv2 'lin': short side 512, 512-px windows with stride 341, no flip",
    ),
    "ms": Protocol(
        "ms", scale=(99999999, 640), ratios=(1.0, 1.32, 1.73, 2.28, 3.0), flip=True, crop=640, stride=320,
        description="DINOv2 '+ms': short side 640 x (1.0, 1.32, 1.73, 2.28, 3.0), each with its flip, 640-px windows, stride 320",
    ),
}  # fmt: skip


def get_protocol(name: str) -> Protocol:
    """The protocol ``name``; ConfigError listing the valid ones otherwise."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; valid: {', '.join([CACHE, *PROTOCOLS])}")
    return PROTOCOLS[name]


def rescaled_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) after mmcv's ``imrescale`` to ``scale`` = (long-side cap, short side), aspect kept."""
    long_cap, short = max(scale), min(scale)
    factor = min(long_cap / max(height, width), short / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def view_scale(scale: tuple[int, int], ratio: float) -> tuple[int, int]:
    """The img_scale of one ratio, as MultiScaleFlipAug computes it (truncating)."""
    return int(scale[0] * ratio), int(scale[1] * ratio)


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every sliding window over a ``height x width`` image, row by row."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def centre_pad(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """(..., H, W) -> zero-padded so both sides are multiples of ``multiple``; the extra row/column
    of an odd padding goes to the bottom/right (the official ``CenterPadding``)."""
    pads: list[int] = []
    for size in (pixels.shape[-1], pixels.shape[-2]):
        extra = math.ceil(size / multiple) * multiple - size
        pads += [extra // 2, extra - extra // 2]
    return F.pad(pixels, pads) if any(pads) else pixels
