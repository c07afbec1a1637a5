"""Pseudo-masks from image-level labels: pooling, the mask rule, the K-means refinement, the masks made on
toy data (only labelled classes, better than a trivial baseline), IRN's integer ids, and the label set
through train-head and evaluate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.cache.geometry import IGNORE, fit_geometry
from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.labels import LabelSet, ensure_labels
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig, PseudoMaskConfig, TrainConfig
from pipeline.errors import ConfigError, LabelError
from pipeline.features.data import find_images
from pipeline.features.extract import extract, store_path
from pipeline.training.evaluate import evaluate
from pipeline.training.metrics import ConfusionMatrix
from pipeline.training.pseudo_masks import (
    DEFAULT_THRESHOLD,
    THRESHOLDS,
    decide,
    lse_pool,
    make_pseudo_masks,
    refine_with_clusters,
)
from pipeline.training.runs import resolve_labels, train_and_evaluate
from pipeline.workspace import Workspace

# A 16 x 16 token grid from a tiny random ViT: enough shape for class maps, fast on a CPU.
TINY = ExtractConfig(model="vit_tiny_test", random_init=True, size=224, flip=True, workers=0)
FAST = PseudoMaskConfig(lr=1e-2, epochs=1, min_steps=80)


def test_lse_pool_is_its_formula_and_sits_between_mean_and_max():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    content = torch.zeros(2, 4, 5, dtype=torch.bool)
    content[0, 1:3, :] = True
    content[1] = True
    for r in (0.5, 5.0):
        got = lse_pool(logits, content, r)
        for b in range(2):
            z = logits[b][:, content[b]]  # (K, n) content logits only
            expected = torch.log(torch.exp(r * z).mean(1)) / r
            torch.testing.assert_close(got[b], expected)
    mean = torch.stack([logits[b][:, content[b]].mean(1) for b in range(2)])
    peak = torch.stack([logits[b][:, content[b]].amax(1) for b in range(2)])
    torch.testing.assert_close(lse_pool(logits, content, 1e-3), mean, atol=1e-3, rtol=0)
    torch.testing.assert_close(lse_pool(logits, content, 1e3), peak, atol=1e-2, rtol=0)
    assert ((mean <= lse_pool(logits, content, 5.0) + 1e-6) & (lse_pool(logits, content, 5.0) <= peak + 1e-6)).all()


def test_decide_thresholds_keeps_labelled_classes_and_leaves_the_band_and_padding_out():
    geom = fit_geometry(28, 56, 56)  # content rows 14..42
    scores = np.zeros((2, 56, 56), np.float32)
    scores[0, :, :20] = 0.9  # class 3 strong on the left
    scores[1, :, 30:] = 0.6  # class 7 on the right
    scores[1, :, 50:] = 0.32  # near the threshold
    mask = decide(scores, np.array([3, 7]), geom, threshold=0.3, band=0.05)
    content = geom.content_mask()
    assert (mask[~content] == IGNORE).all()
    assert (mask[content][:0] == 0).all()
    assert set(np.unique(mask[content])) == {0, 3, 7, IGNORE}
    assert (mask[14:42, :20] == 3).all()
    assert (mask[14:42, 20:30] == 0).all()
    assert (mask[14:42, 30:50] == 7).all()
    assert (mask[14:42, 50:] == IGNORE).all()
    assert (decide(scores[:0], np.array([], int), geom, 0.3, 0.05)[content] == 0).all()  # no class: background


def test_refinement_never_brings_a_class_the_mask_did_not_have():
    rng = np.random.default_rng(0)
    geom = fit_geometry(40, 56, 56)
    content = geom.content_mask()
    for trial in range(50):
        classes = rng.choice(np.arange(1, 21), size=rng.integers(1, 4), replace=False)
        mask = rng.choice(np.r_[0, classes, IGNORE], size=(56, 56)).astype(np.uint8)
        mask[~content] = IGNORE
        clusters = rng.integers(0, 5, size=(4, 4)).astype(np.int16)
        clusters[~geom.content_mask(grid=4)] = -1
        out = refine_with_clusters(mask, clusters, content, min_share=float(rng.uniform(0.3, 1.0)))
        assert set(np.unique(out)) <= {0, *classes.tolist(), IGNORE}, trial
        assert (out[~content] == IGNORE).all()
        # every cluster is uniform: one label (or 255) over its content pixels
        pixel_cluster = np.repeat(np.repeat(clusters, 14, 0), 14, 1)
        for c in np.unique(clusters[clusters >= 0]):
            assert len(np.unique(out[(pixel_cluster == c) & content])) == 1


def test_refinement_takes_the_majority_of_confident_pixels():
    geom = fit_geometry(28, 28, 28)  # 2 x 2 tokens of 14 px, all content
    mask = np.zeros((28, 28), np.uint8)
    mask[:14, :14] = 5  # cluster 0: top row of tokens, half 5 and half 0 -> a tie at 0.5
    mask[:14, 14:] = 0
    mask[14:, :] = 9
    mask[14:, :3] = IGNORE  # ignored pixels do not vote
    clusters = np.array([[0, 0], [1, 1]], np.int16)
    out = refine_with_clusters(mask, clusters, geom.content_mask(), min_share=0.6)
    assert (out[:14] == IGNORE).all()  # no label reaches 60 %
    assert (out[14:] == 9).all()  # the 255 pixels inside the cluster take its label
    out = refine_with_clusters(mask, clusters, geom.content_mask(), min_share=0.5)
    assert len(np.unique(out[:14])) == 1
    assert out[0, 0] in (0, 5)


# --- on toy data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(toy, tmp_path_factory) -> Workspace:
    """A copy of the toy workspace with its train and val splits extracted by a tiny random ViT."""
    root = tmp_path_factory.mktemp("pseudo") / "toy"
    shutil.copytree(toy.root, root)
    w = Workspace.load(root / "ssvt.toml")
    for split in ("train", "val"):
        extract(find_images(w.data_root, split), store_path(TINY, w.layout, split), TINY)
    return w


@pytest.fixture(scope="module")
def made(ws):
    store = FeatureStore.open(store_path(TINY, ws.layout, "train"))
    return store, make_pseudo_masks(store, ws.label_source("cls"), FAST, num_classes=21, gt=ws.labels["gt"])


def test_masks_hold_only_the_images_labelled_classes(made):
    store, result = made
    masks = result.labels.masks(np.arange(store.n_images))
    for i, mask in enumerate(masks):
        allowed = {0, IGNORE, *(np.flatnonzero(result.flags[i]) + 1).tolist()}
        assert set(np.unique(mask).tolist()) <= allowed, store.ids[i]
        assert (mask[~store.geometries()[i].content_mask()] == IGNORE).all()
    assert (masks != IGNORE).mean() > 0.3  # they label most of the content
    assert result.images == store.n_images


def test_masks_beat_the_whole_box_baseline(made, ws):
    """Baseline: the content box filled with the labelled class that covers the most ground truth.
    Ours is scored with its unconfident pixels counted as background, so it cannot gain by abstaining."""
    store, result = made
    gt = ensure_labels(ws.labels["gt"], store, num_classes=21)
    ours, box = ConfusionMatrix(21), ConfusionMatrix(21)
    targets, masks = gt.masks(np.arange(store.n_images)), result.labels.masks(np.arange(store.n_images))
    for i, (target, mask) in enumerate(zip(targets, masks, strict=True)):
        content = store.geometries()[i].content_mask()
        ours.update(np.where(mask == IGNORE, 0, mask), target)
        classes = np.flatnonzero(result.flags[i]) + 1
        biggest = classes[np.argmax([(target == c).sum() for c in classes])]
        box.update(np.where(content, biggest, 0).astype(np.uint8), target)
    assert ours.miou() > box.miou() + 0.1, (ours.miou(), box.miou())
    # the recorded quality is the same measurement on labelled pixels only
    confident = ConfusionMatrix(21)
    confident.update(masks, np.where(masks == IGNORE, IGNORE, targets))
    assert result.quality["miou"] == pytest.approx(confident.miou())


def test_threshold_is_chosen_on_ground_truth_and_recorded(made):
    store, result = made
    assert result.threshold in THRESHOLDS
    assert "best mIoU against 'gt'" in result.threshold_source
    method = result.labels.attrs["method"]
    assert method["threshold"] == result.threshold
    assert method["config"] == FAST.to_dict()
    assert result.labels.attrs["kind"] == "mask"
    assert result.labels.attrs["quality"] == result.quality
    assert result.labels.attrs["store_fingerprint"] == store.fingerprint()


def test_without_ground_truth_the_default_threshold_is_used_and_stated(ws, tmp_path):
    store = FeatureStore.open(store_path(TINY, ws.layout, "train"))
    cfg = PseudoMaskConfig(lr=1e-2, epochs=1, min_steps=5, out_labels="cam_nogt")
    result = make_pseudo_masks(store, ws.label_source("cls"), cfg, num_classes=21)
    assert (result.threshold, result.quality) == (DEFAULT_THRESHOLD, {})
    assert result.threshold_source.startswith("default")
    given = make_pseudo_masks(
        store, ws.label_source("cls"), PseudoMaskConfig(**{**cfg.to_dict(), "threshold": 0.4}), num_classes=21
    )
    assert (given.threshold, given.threshold_source) == (0.4, "given")


def test_irn_integer_ids_give_the_same_masks(made, ws):
    store, result = made
    ints = LabelSource("cls_int", "cls-labels", ws.labels["cls"].path.with_name("cls_labels_int.npy"))
    cfg = PseudoMaskConfig(**{**FAST.to_dict(), "out_labels": "cam_int"})
    again = make_pseudo_masks(store, ints, cfg, num_classes=21, gt=ws.labels["gt"])
    everything = np.arange(store.n_images)
    np.testing.assert_array_equal(again.labels.masks(everything), result.labels.masks(everything))


def test_kmeans_refinement_on_toy_data_keeps_to_labelled_classes(made, ws):
    store, result = made
    cfg = PseudoMaskConfig(**{**FAST.to_dict(), "out_labels": "cam_km", "kmeans": 4, "threshold": result.threshold})
    refined = make_pseudo_masks(store, ws.label_source("cls"), cfg, num_classes=21)
    masks = refined.labels.masks(np.arange(store.n_images))
    for i, mask in enumerate(masks):
        assert set(np.unique(mask).tolist()) <= {0, IGNORE, *(np.flatnonzero(refined.flags[i]) + 1).tolist()}
    assert refined.labels.attrs["method"]["config"]["kmeans"] == 4


def test_the_label_set_trains_and_evaluates_like_any_other(made, ws, tmp_path):
    _, result = made
    assert resolve_labels("cam", ws) == "cam"  # not a source of ssvt.toml: the label set beside the train store
    outcome = train_and_evaluate(TrainConfig(lr=1e-2, epochs=1, min_steps=30, batch_size=8), "cam", ws, gt=ws.labels["gt"],
                                 out=tmp_path / "run")  # fmt: skip
    assert outcome.labels == "cam"
    assert outcome.evaluation is not None
    assert 0 < outcome.evaluation.miou <= 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["labels"]["name"] == "cam"
    assert config["labels"]["fingerprint"] == LabelSet.open(result.labels.path).fingerprint
    again = evaluate(tmp_path / "run", ws.labels["gt"])
    assert again.miou == pytest.approx(outcome.evaluation.miou)


def test_bad_inputs_are_clear_errors(made, ws):
    store, _ = made
    with pytest.raises(LabelError, match="holds no image-level labels"):
        make_pseudo_masks(store, ws.labels["eps"], FAST, num_classes=21)
    with pytest.raises(ConfigError, match="needs dense masks"):
        make_pseudo_masks(store, ws.labels["cls"], FAST, num_classes=21, gt=ws.labels["scribble"])
    with pytest.raises(ConfigError, match="new label set name"):
        PseudoMaskConfig(labels="cls", out_labels="cls")
    with pytest.raises(ConfigError, match="neither a label source"):
        resolve_labels("nothing", ws)
    other = ExtractConfig(**{**TINY.to_dict(), "size": 112})
    extract(find_images(ws.data_root, "train"), store_path(other, ws.layout, "train"), other)
    with pytest.raises(ConfigError, match="neither a label source"):  # two caches now: which train store is meant?
        resolve_labels("cam", ws)
    assert resolve_labels("cam", ws, features=store.path.parent.name) == "cam"
    assert resolve_labels("cam", ws, store_path=store.path) == "cam"


def test_figure_rows_are_at_the_original_size_and_follow_the_label_set(made, ws, tmp_path):
    from pipeline.training.pseudo_masks import cam_figure_rows, draw_cam_figure

    store, result = made
    rows = cam_figure_rows(store, result, gt=ws.labels["gt"], n=3, seed=1)
    assert len(rows) == 3
    index = {image_id: i for i, image_id in enumerate(store.ids)}
    assert [index[r.image_id] for r in rows] == sorted(index[r.image_id] for r in rows)  # store order
    geoms = store.geometries()
    for row in rows:
        i, geom = index[row.image_id], geoms[index[row.image_id]]
        assert row.image.shape == (geom.height, geom.width, 3)
        assert [c for c, _ in row.cams] == (np.flatnonzero(result.flags[i]) + 1).tolist()
        for _, cam in row.cams:
            assert cam.shape == (geom.height, geom.width)
            assert cam.min() >= 0
            assert cam.max() <= 1
        # the mask drawn is the label set's canvas mask brought back to the image's size
        assert set(np.unique(row.mask)) <= set(np.unique(result.labels.masks(np.array([i]))[0]))
        assert row.gt is not None
        assert row.gt.shape == row.mask.shape
    png, pdf = draw_cam_figure(store, result, tmp_path, gt=ws.labels["gt"], n=2)
    assert png == tmp_path / "cam.png"
    assert png.stat().st_size > 0
    assert pdf.stat().st_size > 0
