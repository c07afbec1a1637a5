"""Dataset conventions besides VOC's (:mod:`pipeline.cache.voc`): class lists, split folders, mask mappings.

Usage::

    folder_splits("my_set")                 # ["train", "val"]: my_set/images/train/, my_set/images/val/
    DATASET_CLASSES["ade20k"][0]            # "wall": ADE20K class 1 on disk, 0 after reduce-zero-label
    mask_table("cityscapes")[26]            # 13: labelId 26 (car) is trainId 13

Masks are mapped where they are read (:func:`pipeline.cache.label_readers.read_mask`), so training and
evaluation see the same class ids:

- ``ade20k`` (ADEChallengeData2016, mmseg ``reduce_zero_label``): 0 (other) -> 255 (ignore), classes
  1..150 -> 0..149, 255 stays 255.
- ``cityscapes``: ``*_gtFine_labelIds.png`` go through the official labelId -> trainId table (19
  classes, everything else 255); ``*_gtFine_labelTrainIds.png`` are trainIds already and read as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cache.geometry import IGNORE
from pipeline.cache.voc import CLASS_NAMES as VOC_CLASSES
from pipeline.errors import ConfigError

#: The 150 ADE20K (SceneParse150) classes in training-id order, as mmseg's ``ADE20KDataset`` lists them
#: (its "bed " without the trailing space).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip

#: cityscapesscripts ``helpers/labels.py``: labelId -> trainId of the 19 evaluated classes; every
#: other labelId (void, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan,
#: trailer) is trainId 255.
CITYSCAPES_TRAIN_IDS: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

#: The 19 Cityscapes classes in trainId order.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

#: The class names of each dataset format that has its own (``folder`` and ``list`` take ``classes``).
DATASET_CLASSES: dict[str, tuple[str, ...]] = {"voc": VOC_CLASSES, "ade20k": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES}

#: ADE20K's split folder names, and the short names accepted for them.
ADE20K_SPLITS: dict[str, str] = {"training": "training", "validation": "validation", "train": "training", "val": "validation"}

#: Mask conventions by name (a ``[labels.NAME]`` ``mapping``; the gt of the format of the same name).
MASK_MAPPINGS = ("ade20k", "cityscapes")


def mask_table(mapping: str) -> np.ndarray:
    """(256,) uint8 lookup table of a mask mapping: ``table[mask]`` is the mapped mask."""
    if mapping == "ade20k":
        table = np.arange(256, dtype=np.int64) - 1
        table[0] = table[IGNORE] = IGNORE
        return table.astype(np.uint8)
    if mapping == "cityscapes":
        table = np.full(256, IGNORE, dtype=np.uint8)
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            table[label_id] = train_id
        return table
    raise ConfigError(f"unknown mask mapping {mapping!r}; valid: {', '.join(MASK_MAPPINGS)}")


def folder_splits(root: str | Path) -> list[str]:
    """The split folders of a folder dataset, ``root/images/<split>/``, sorted; [] when its images lie
    directly in ``images/`` (or in ``root``), so every split would be the same images."""
    images = Path(root) / "images"
    return sorted(p.name for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
