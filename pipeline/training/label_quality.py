"""``ssvt score-labels``: how good a label set is against ground truth (the paper's "pseudo-label itself" row).

Usage::

    quality = score_labels(labels, store, ws.labels["gt"], source=ws.label_source("eps"))
    quality.miou, quality.coverage          # also written into the label set's "quality" attribute

Dense sets (pseudo-masks, vision-language masks) are scored like a prediction: one confusion matrix
over the pixels the set labels (its 255 pixels are left out), mIoU over the classes present and pixel
accuracy. Sparse sets (scribbles, clicks) get the precision of their labels per class. Every set gets
its coverage, the fraction of image pixels it labels. Sets read from mask files are compared at the
images' original resolution; the rest (scribbles, clicks, sets ssvt made) on the store's canvas, where
they live, against the ground truth placed on the canvas the same way (nearest neighbour).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.cache.geometry import IGNORE
from pipeline.cache.label_kinds import LabelSource, get_label_kind
from pipeline.cache.labels import LabelSet, update_label_attrs
from pipeline.cache.names import ImageStatus
from pipeline.cache.store import FeatureStore
from pipeline.errors import LabelError
from pipeline.training.evaluate import class_names
from pipeline.training.metrics import ConfusionMatrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelQuality:
    """A label set's agreement with ground truth (see the module docstring)."""

    name: str
    sparse: bool
    resolution: str  # "original" or "canvas"
    images: int
    miou: float | None
    pixel_accuracy: float | None  # = overall label precision for sparse sets
    coverage: float
    precision: dict[str, float | None]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def score_labels(
    labels: LabelSet,
    store: FeatureStore,
    gt: LabelSource,
    *,
    source: LabelSource | None = None,
    num_classes: int = 21,
    write: bool = True,
    names: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LabelQuality:
    """Score ``labels`` (imported from ``store``; ``source`` its files, None for sets ssvt made)."""
    gt.require_dense("scoring labels")
    original = source is not None and get_label_kind(source.kind).dense
    gt_reader = gt.reader(num_classes)
    own = source.reader(num_classes) if original and source is not None else None
    cm = ConfusionMatrix(num_classes)
    labelled = pixels = images = 0
    geoms, status = store.geometries(), store.status()
    for index, image_id in enumerate(store.ids):
        if progress:
            progress(index + 1, store.n_images)
        if status[index] != ImageStatus.OK:
            continue
        geom = geoms[index]
        if own is not None:
            found, truth = own.original(image_id, geom), gt_reader.original(image_id, geom)
            if found is None or truth is None:
                continue
            label, target, content = found[1], truth[1], np.ones(truth[1].shape, dtype=bool)
        else:
            target_canvas = gt_reader.canvas(image_id, geom)
            if target_canvas is None:
                continue
            label, target, content = labels.masks(np.array([index]))[0], target_canvas, geom.content_mask()
        images += 1
        cm.update(label, np.where((label == IGNORE) | ~content, IGNORE, target))
        labelled += int(((label != IGNORE) & content).sum())
        pixels += int(content.sum())
    if not images:
        raise LabelError(f"no image of {store.path} has both a {labels.name!r} label and ground truth in {gt.path}")
    quality = _summary(labels, cm, images, labelled / max(1, pixels), "original" if own is not None else "canvas", names)
    if write:
        update_label_attrs(labels.path, quality=json.dumps(quality.to_dict()))
    log.info("label set %r against %s: %s", labels.name, gt.name, quality)
    return quality


def _summary(
    labels: LabelSet, cm: ConfusionMatrix, images: int, coverage: float, resolution: str, names: Sequence[str] | None
) -> LabelQuality:
    matrix = cm.matrix.astype(np.float64)
    predicted = matrix.sum(0)  # pixels the set gives each class (where ground truth is known)
    precision = np.divide(np.diag(matrix), predicted, out=np.full(len(predicted), np.nan), where=predicted > 0)
    names = class_names(cm.num_classes, names)
    per_class = {n: (None if np.isnan(p) else float(p)) for n, p in zip(names, precision, strict=True)}
    miou = None if labels.sparse or np.isnan(cm.miou()) else float(cm.miou())
    accuracy = cm.pixel_accuracy()
    return LabelQuality(labels.name, labels.sparse, resolution, images, miou,
                        None if np.isnan(accuracy) else float(accuracy), float(coverage), per_class)  # fmt: skip
