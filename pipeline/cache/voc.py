"""PASCAL VOC constants: the 21 class names, the devkit colour palette and the short scribble tags.

Usage: ``palette()[class_id]`` is the RGB colour of a class; ``255`` (void) is (224, 224, 192).
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)

#: ScribbleSup's short tags, mapped to VOC class ids (full names are accepted as well).
SCRIBBLE_TAGS: dict[str, int] = {
    **{name: i for i, name in enumerate(CLASS_NAMES)},
    "plane": 1, "bike": 2, "table": 11, "plant": 16, "monitor": 20, "tv": 20, "motorcycle": 14,
}  # fmt: skip


def palette() -> np.ndarray:
    """(256, 3) uint8, the VOC devkit bit-shift colormap (class 1 = (128, 0, 0), 255 = (224, 224, 192))."""
    cmap = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap
