"""Metrics: one confusion matrix over the split, checked against brute force and torchmetrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from pipeline.errors import DataError, LabelError
from pipeline.training.metrics import ConfusionMatrix, Scorer

K = 6


def random_batches(n: int = 4, k: int = K, absent: tuple[int, ...] = (), seed: int = 0):
    """(pred, target) pairs (2, 17, 23) with ~20% ignored pixels; ``absent`` classes never appear."""
    rng = np.random.default_rng(seed)
    present = np.array([c for c in range(k) if c not in absent])
    out = []
    for _ in range(n):
        target = rng.choice(present, size=(2, 17, 23)).astype(np.uint8)
        pred = np.where(rng.random(target.shape) < 0.6, target, rng.choice(present, size=target.shape))
        target[rng.random(target.shape) < 0.2] = 255
        out.append((pred.astype(np.int64), target))
    return out


def brute_force_iou(batches, k: int) -> np.ndarray:
    tp, fp, fn = np.zeros(k), np.zeros(k), np.zeros(k)
    for pred, target in batches:
        for p, t in zip(pred.ravel(), target.ravel(), strict=True):
            if t == 255:
                continue
            if p == t:
                tp[t] += 1
            else:
                fp[p] += 1
                fn[t] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)


def accumulate(batches, k: int = K, as_torch: bool = False) -> ConfusionMatrix:
    cm = ConfusionMatrix(k)
    for pred, target in batches:
        if as_torch:
            cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        else:
            cm.update(pred, target)
    return cm


@pytest.mark.parametrize("as_torch", [False, True])
def test_matches_brute_force(as_torch: bool) -> None:
    batches = random_batches()
    cm = accumulate(batches, as_torch=as_torch)
    np.testing.assert_allclose(cm.iou(), brute_force_iou(batches, K), rtol=1e-12)
    valid = [t != 255 for _, t in batches]
    correct = sum(int((p[v] == t[v]).sum()) for (p, t), v in zip(batches, valid, strict=True))
    total = sum(int(v.sum()) for v in valid)
    assert cm.matrix.sum() == total
    assert cm.pixel_accuracy() == pytest.approx(correct / total, rel=1e-12)
    assert cm.miou() == pytest.approx(np.mean(brute_force_iou(batches, K)), rel=1e-12)


def test_single_image_and_batch_shapes_agree() -> None:
    batches = random_batches(n=2)
    per_image = ConfusionMatrix(K)
    for pred, target in batches:
        for i in range(pred.shape[0]):
            per_image.update(pred[i], target[i])
    np.testing.assert_array_equal(per_image.matrix, accumulate(batches).matrix)


def test_matrix_orientation_rows_are_ground_truth() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([[2, 2, 1]]), np.array([[0, 0, 1]], dtype=np.uint8))
    expected = np.array([[0, 0, 2], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.matrix.dtype == np.int64
    np.testing.assert_allclose(cm.iou(), [0.0, 1.0, 0.0])


@pytest.mark.parametrize("absent", [(), (3,), (0, 5)])
def test_matches_torchmetrics_over_split(absent: tuple[int, ...]) -> None:
    batches = random_batches(absent=absent, seed=1)
    cm = accumulate(batches)
    jac = MulticlassJaccardIndex(num_classes=K, ignore_index=255, average="macro")
    per_class = MulticlassJaccardIndex(num_classes=K, ignore_index=255, average="none")
    confmat = MulticlassConfusionMatrix(num_classes=K, ignore_index=255)
    for pred, target in batches:
        p, t = torch.from_numpy(pred), torch.from_numpy(target.astype(np.int64))
        jac.update(p, t)
        per_class.update(p, t)
        confmat.update(p, t)
    np.testing.assert_array_equal(cm.matrix, confmat.compute().numpy())
    assert cm.miou() == pytest.approx(jac.compute().item(), rel=1e-6)
    # torchmetrics reports 0 (zero_division) per class where we report NaN, and skips those classes in
    # the macro average exactly as our nanmean does; where defined, the per-class values agree.
    ours, theirs = cm.iou(), per_class.compute().numpy()
    defined = ~np.isnan(ours)
    assert list(np.flatnonzero(~defined)) == list(absent)
    np.testing.assert_allclose(ours[defined], theirs[defined], rtol=1e-6)
    assert (theirs[~defined] == 0).all()


def test_class_only_in_prediction_counts_with_iou_zero() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 2]]), np.array([[0, 0]], dtype=np.uint8))
    iou = cm.iou()
    assert iou[0] == 0.5
    assert iou[2] == 0.0
    assert math.isnan(iou[1])
    assert cm.miou() == pytest.approx(0.25)


def test_split_matrix_differs_from_per_image_average() -> None:
    """A small image with a bad prediction weighs as much as a large one in per-image averaging."""
    big_t = np.zeros((10, 10), dtype=np.uint8)
    big_t[:, 5:] = 1
    big_p = big_t.copy()
    small_t = np.array([[0, 1]], dtype=np.uint8)
    small_p = np.array([[1, 0]])
    cm = ConfusionMatrix(2)
    cm.update(big_p, big_t)
    cm.update(small_p, small_t)
    per_image = []
    for p, t in ((big_p, big_t), (small_p, small_t)):
        one = ConfusionMatrix(2)
        one.update(p, t)
        per_image.append(one.miou())
    assert per_image == [1.0, 0.0]
    assert cm.miou() == pytest.approx(50 / 52)  # each class: TP 50, FP 1, FN 1
    assert abs(cm.miou() - np.mean(per_image)) > 0.4


def test_ignored_pixels_do_not_count_even_with_out_of_range_prediction() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.array([[1, 255, 7]]), np.array([[1, 255, 255]], dtype=np.uint8))
    assert cm.matrix.sum() == 1


@pytest.mark.parametrize("as_torch", [False, True])
def test_out_of_range_values(as_torch: bool) -> None:
    def wrap(a):
        return torch.from_numpy(np.asarray(a)) if as_torch else np.asarray(a)

    cm = ConfusionMatrix(3)
    with pytest.raises(DataError, match="prediction holds class 3"):
        cm.update(wrap([[0, 3]]), wrap([[0, 1]]))
    with pytest.raises(DataError, match="prediction holds class -1"):
        cm.update(wrap([[0, -1]]), wrap([[0, 1]]))
    with pytest.raises(LabelError, match="ground truth holds class 4"):
        cm.update(wrap([[0, 1]]), wrap([[0, 4]]))
    with pytest.raises(DataError, match="shape"):
        cm.update(wrap([[0, 1]]), wrap([[0, 1, 2]]))
    assert cm.matrix.sum() == 0  # failed updates add nothing


def test_empty_and_all_ignored() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.zeros((4, 4), dtype=np.int64), np.full((4, 4), 255, dtype=np.uint8))
    assert math.isnan(cm.miou())
    assert math.isnan(cm.pixel_accuracy())
    assert cm.to_dict()["miou"] is None


def test_to_dict_merge_and_from_matrix() -> None:
    batches = random_batches(absent=(2,))
    cm = accumulate(batches)
    d = cm.to_dict(["a", "b", "c", "d", "e", "f"])
    json.dumps(d)  # JSON-ready
    assert d["iou"]["c"] is None
    assert d["miou"] == pytest.approx(cm.miou())
    assert d["pixels"] == int(cm.matrix.sum())
    half1, half2 = accumulate(batches[:2]), accumulate(batches[2:])
    half1.merge(half2)
    np.testing.assert_array_equal(half1.matrix, cm.matrix)
    np.testing.assert_array_equal(ConfusionMatrix.from_matrix(cm.matrix).matrix, cm.matrix)
    cm.reset()
    assert cm.matrix.sum() == 0
    with pytest.raises(ValueError, match="class names"):
        cm.to_dict(["a"])


def _image_miou(pred: np.ndarray, gt: np.ndarray, k: int) -> float | None:
    """Brute force: IoU of every class in the image's ground truth or prediction (void excluded)."""
    valid = gt != 255
    ious = []
    for c in range(k):
        p, t = (pred == c) & valid, (gt == c) & valid
        union = (p | t).sum()
        if union:
            ious.append((p & t).sum() / union)
    return float(np.mean(ious)) if ious else None


def test_scorer_per_image_miou_and_worst_images():
    rng = np.random.default_rng(3)
    scorer = Scorer(5, keep_worst=3)
    expected, total = {}, ConfusionMatrix(5)
    for i in range(12):
        gt = rng.integers(0, 5, (9, 11)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.2] = 255
        pred = np.where(rng.random(gt.shape) < i / 12, rng.integers(0, 5, gt.shape), gt).astype(np.uint8)
        pred[gt == 255] = rng.integers(0, 5)
        expected[f"im{i}"] = _image_miou(pred, gt, 5)
        total.update(pred, gt)
        assert scorer.update(f"im{i}", pred, gt) == pytest.approx(expected[f"im{i}"])
    scorer.update("void", np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8))
    assert scorer.per_image["void"] is None
    assert scorer.per_image == pytest.approx({**expected, "void": None})
    worst = scorer.worst()
    lowest = sorted(expected, key=lambda k: expected[k])[:3]
    assert [w.id for w in worst] == lowest
    assert [w.iou for w in worst] == sorted(w.iou for w in worst)
    assert worst[0].pred.dtype == np.uint8
    assert worst[0].gt.shape == (9, 11)
    np.testing.assert_array_equal(scorer.cm.matrix, total.matrix)  # the split's matrix is the sum over images
