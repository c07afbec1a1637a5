"""Segmentation metrics from one confusion matrix accumulated over a whole split, as papers report mIoU.

IoU_c = TP / (TP + FP + FN) per class, NaN when TP + FP + FN == 0 (the class occurs neither in the
ground truth nor in the predictions); mIoU is the mean over the other classes. This equals torchmetrics
``MulticlassJaccardIndex(average="macro", ignore_index=255)``; it is *not* the mean of per-image IoUs::

    cm = ConfusionMatrix(21)
    for pred, gt in split:                         # (H, W) or (N, H, W) ints; numpy or torch
        cm.update(pred, gt)                        # gt 255 = ignored; torch stays on its device
    cm.miou(), cm.to_dict(CLASS_NAMES)

    scorer = Scorer(21, keep_worst=8)              # the split's matrix, plus each image's own mIoU
    scorer.update("2007_000033", pred, gt)         # and the 8 lowest-scoring images kept for a figure
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.cache.geometry import IGNORE
from pipeline.errors import DataError, LabelError


class ConfusionMatrix:
    """(K, K) int64 counts over a split; rows = ground truth class, columns = predicted class."""

    def __init__(self, num_classes: int) -> None:
        if num_classes <= 0 or num_classes >= IGNORE:
            raise ValueError(f"num_classes must be in 1..{IGNORE - 1}, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> ConfusionMatrix:
        """Wrap existing counts (e.g. all-reduced over processes)."""
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a confusion matrix is square (K, K), got shape {matrix.shape}")
        cm = cls(matrix.shape[0])
        cm.matrix = matrix.astype(np.int64, copy=True)
        return cm

    def reset(self) -> None:
        self.matrix[:] = 0

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix's counts (same K) into this one."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.matrix += other.matrix

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Count one prediction map or a batch: pred and target of the same shape ((H, W) or (N, H, W)),
        integer class ids; pixels where target == 255 are skipped (pred there may be anything).

        Torch tensors are counted on their own device; only the K*K counts move to the CPU.
        """
        if tuple(pred.shape) != tuple(target.shape):
            raise DataError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        if isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor):
            self.matrix += self._counts_torch(torch.as_tensor(pred), torch.as_tensor(target))
        else:
            self.matrix += self._counts_numpy(np.asarray(pred), np.asarray(target))

    def _check(self, pmin: int, pmax: int, tmin: int, tmax: int) -> None:
        k = self.num_classes
        if tmin < 0 or tmax >= k:
            bad = tmax if tmax >= k else tmin
            raise LabelError(f"ground truth holds class {bad}, expected 0..{k - 1} or {IGNORE} = ignore")
        if pmin < 0 or pmax >= k:
            bad = pmax if pmax >= k else pmin
            raise DataError(f"prediction holds class {bad} on a labelled pixel, expected 0..{k - 1}")

    def _counts_numpy(self, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
        k = self.num_classes
        valid = target != IGNORE
        t = target[valid].astype(np.int64)
        p = pred[valid].astype(np.int64)
        if t.size == 0:
            return np.zeros((k, k), dtype=np.int64)
        self._check(int(p.min()), int(p.max()), int(t.min()), int(t.max()))
        return np.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def _counts_torch(self, pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        k = self.num_classes
        pred = pred.to(target.device)
        valid = target != IGNORE
        t = target[valid].long()
        p = pred[valid].long()
        if t.numel() == 0:
            return np.zeros((k, k), dtype=np.int64)
        # One device sync for all range checks together.
        pmin, pmax, tmin, tmax = torch.stack([p.min(), p.max(), t.min(), t.max()]).tolist()
        self._check(pmin, pmax, tmin, tmax)
        return torch.bincount(t * k + p, minlength=k * k).reshape(k, k).cpu().numpy().astype(np.int64)

    def iou(self) -> np.ndarray:
        """(K,) float64, NaN for classes with TP + FP + FN == 0."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        out = np.full(self.num_classes, np.nan)
        np.divide(tp, union, out=out, where=union > 0)
        return out

    def miou(self) -> float:
        """Mean IoU over classes present in the ground truth or the predictions; NaN if none is."""
        iou = self.iou()
        defined = iou[~np.isnan(iou)]
        return float(defined.mean()) if defined.size else float("nan")

    def pixel_accuracy(self) -> float:
        """Correct / labelled pixels; NaN before any labelled pixel was counted."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready summary: miou, pixel_accuracy, labelled pixel count, per-class IoU (None = NaN)."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for a {self.num_classes}-class matrix")

        def clean(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        return {
            "miou": clean(self.miou()),
            "pixel_accuracy": clean(self.pixel_accuracy()),
            "pixels": int(self.matrix.sum()),
            "iou": {name: clean(v) for name, v in zip(names, self.iou(), strict=True)},
        }


@dataclass(frozen=True)
class Scored:
    """One image's prediction and ground truth, (H, W) uint8 each, with its own mIoU."""

    id: str
    iou: float
    pred: np.ndarray
    gt: np.ndarray


class Scorer:
    """The split's confusion matrix, each image's own mIoU, and the ``keep_worst`` lowest images.

    An image's mIoU is the mean IoU over the classes in its ground truth or prediction (its own
    confusion matrix); None when it has no labelled pixel. Only the worst few predictions are kept,
    so memory does not grow with the split.
    """

    def __init__(self, num_classes: int, keep_worst: int = 0) -> None:
        self.cm = ConfusionMatrix(num_classes)
        self.per_image: dict[str, float | None] = {}
        self.keep_worst = keep_worst
        self._heap: list[tuple[float, int, Scored]] = []  # max-heap on IoU via negation
        self._order = itertools.count()

    def update(self, image_id: str, pred: np.ndarray | torch.Tensor, target: np.ndarray) -> float | None:
        """Count one image; returns its mIoU."""
        pred = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
        one = ConfusionMatrix(self.cm.num_classes)
        one.update(pred, target)
        self.cm.merge(one)
        value = one.miou() if one.matrix.sum() else float("nan")
        iou = None if np.isnan(value) else float(value)
        self.per_image[image_id] = iou
        if iou is not None and self.keep_worst:
            item = (-iou, next(self._order), Scored(image_id, iou, pred.astype(np.uint8), np.asarray(target, dtype=np.uint8)))
            if len(self._heap) < self.keep_worst:
                heapq.heappush(self._heap, item)
            elif iou < -self._heap[0][0]:
                heapq.heapreplace(self._heap, item)
        return iou

    def worst(self) -> list[Scored]:
        """The kept images, lowest mIoU first."""
        return [entry for _, _, entry in sorted(self._heap, key=lambda e: (-e[0], e[1]))]
