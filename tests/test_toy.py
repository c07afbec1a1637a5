"""The toy dataset: files, formats, determinism, label consistency with GT, pseudo-mask quality."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from pipeline.cache.voc import CLASS_NAMES, palette
from pipeline.errors import ConfigError
from pipeline.toy.dataset import ToyDataset, make_toy
from pipeline.workspace import Workspace

N_TRAIN, N_VAL = 6, 3


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> ToyDataset:
    """A toy dataset of its own (not the session one in conftest.py), made with known counts."""
    return make_toy(tmp_path_factory.mktemp("small"), n_train=N_TRAIN, n_val=N_VAL, seed=0)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
    return im


def _gt(small: ToyDataset, image_id: str) -> np.ndarray:
    return np.asarray(_open(small.voc_root / "SegmentationClass" / f"{image_id}.png"))


def _png(small: ToyDataset, folder: str, image_id: str) -> Image.Image:
    return _open(small.root / "labels" / folder / f"{image_id}.png")


def _miou(gts: list[np.ndarray], preds: list[np.ndarray]) -> float:
    """A plain confusion-matrix mIoU over the classes present in GT or prediction, GT 255 skipped."""
    conf = np.zeros((21, 21), dtype=np.int64)
    for gt, pred in zip(gts, preds, strict=True):
        keep = gt != 255
        np.add.at(conf, (gt[keep].astype(int), pred[keep].astype(int)), 1)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def test_ids_splits_and_images(small: ToyDataset) -> None:
    assert small.train_ids == tuple(f"2026_{i:06d}" for i in range(N_TRAIN))
    assert small.val_ids == tuple(f"2026_{i:06d}" for i in range(N_TRAIN, N_TRAIN + N_VAL))
    seg = small.voc_root / "ImageSets" / "Segmentation"
    assert (seg / "train.txt").read_text().split() == list(small.train_ids)
    assert (seg / "val.txt").read_text().split() == list(small.val_ids)
    pairs = [line.split() for line in (seg / "train_pairs.txt").read_text().splitlines()]
    assert [Path(a).stem for a, _ in pairs] == list(small.train_ids)
    for a, b in pairs:
        assert a.startswith("/JPEGImages/")
        assert b.startswith("/SegmentationClass/")
        assert (small.voc_root / a.lstrip("/")).is_file()
        assert (small.voc_root / b.lstrip("/")).is_file()
    shapes = []
    for image_id in small.train_ids + small.val_ids:
        with Image.open(small.voc_root / "JPEGImages" / f"{image_id}.jpg") as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
            assert 96 <= im.width <= 200
            assert 96 <= im.height <= 200
            shapes.append((im.height, im.width))
    assert any(h > w for h, w in shapes)
    assert any(w > h for h, w in shapes)
    assert len(set(shapes)) > 1


def test_gt_masks_are_voc_palette_pngs_with_void_borders(small: ToyDataset) -> None:
    for image_id in small.train_ids + small.val_ids:
        im = _open(small.voc_root / "SegmentationClass" / f"{image_id}.png")
        assert im.mode == "P"
        assert im.getpalette()[: 256 * 3] == palette().ravel().tolist()
        gt = np.asarray(im)
        assert gt.shape == _open(small.voc_root / "JPEGImages" / f"{image_id}.jpg").size[::-1]
        assert set(np.unique(gt)) <= {*range(21), 255}
        assert (gt == 255).any()
        assert (gt > 0).any()
        assert (gt == 0).any()
        # as in VOC, two different classes never touch: a void band always separates them
        for a, b in ((gt[:, 1:], gt[:, :-1]), (gt[1:], gt[:-1])):
            assert not ((a != b) & (a != 255) & (b != 255)).any()


def test_label_files_have_the_expected_modes_and_values(small: ToyDataset) -> None:
    for image_id in small.train_ids:
        shape = _gt(small, image_id).shape
        for folder in ("pseudo_seam", "pseudo_eps", "vl", "scribbles_png"):
            im = _png(small, folder, image_id)
            assert im.mode == "L"
            assert im.size == shape[::-1]
        for folder in ("pseudo_seam", "pseudo_eps"):
            assert np.asarray(_png(small, folder, image_id)).max() <= 20
        vl = np.asarray(_png(small, "vl", image_id))
        assert set(np.unique(vl)) <= {*range(21), 255}
        assert (vl == 255).any()
        scribbles = np.asarray(_png(small, "scribbles_png", image_id))
        assert (scribbles == 255).mean() > 0.8
        assert (scribbles < 255).any()
        assert (small.root / "labels" / "scribbles" / f"{image_id}.xml").is_file()
    for image_id in small.val_ids:  # imperfect labels are for training images only
        assert not (small.root / "labels" / "pseudo_eps" / f"{image_id}.png").exists()
    rgb = sorted((small.root / "labels" / "gt_rgb").glob("*.png"))
    assert 1 <= len(rgb) <= 5
    for path in rgb:
        im = _open(path)
        assert im.mode == "RGB"
        # the awkward copy: exactly what converting the palette PNG to RGB gives
        palette_png = _open(small.voc_root / "SegmentationClass" / path.name)
        assert np.array_equal(np.asarray(im), np.asarray(palette_png.convert("RGB")))


def test_scribble_xml_uses_short_tags(small: ToyDataset) -> None:
    text = "".join((small.root / "labels" / "scribbles" / f"{i}.xml").read_text() for i in small.train_ids)
    assert "<tag>background</tag>" in text
    classes = {c for i in small.train_ids for c in np.unique(_gt(small, i)) if 0 < c < 255}
    if 1 in classes:
        assert "<tag>plane</tag>" in text
        assert "<tag>aeroplane</tag>" not in text
    if 20 in classes:
        assert "<tag>monitor</tag>" in text
        assert "<tag>tvmonitor</tag>" not in text


def test_clicks_lie_on_their_class(small: ToyDataset) -> None:
    points = json.loads((small.root / "labels" / "points.json").read_text())
    background = json.loads((small.root / "labels" / "points_bg.json").read_text())
    assert set(points) == set(background) == set(small.train_ids)
    outside = 0
    for image_id, clicks in points.items():
        gt = _gt(small, image_id)
        objects = {c for c in np.unique(gt) if 0 < c < 255}
        assert {c["cls"] for c in clicks} <= objects | {0}
        assert objects <= {c["cls"] for c in clicks}
        for c in clicks:
            assert set(c) == {"x", "y", "cls", "rank"}
            assert 1 <= c["cls"] <= 20
            if c["x"] >= gt.shape[1]:
                outside += 1
            elif gt[c["y"], c["x"]] != 255:
                assert gt[c["y"], c["x"]] == c["cls"]
        for c in background[image_id]:
            assert c["cls"] == 0
            assert gt[c["y"], c["x"]] == 0
    assert outside == small.summary["clicks_outside"]


def test_cls_labels_match_the_gt_classes(small: ToyDataset) -> None:
    labels = np.load(small.root / "labels" / "cls_labels.npy", allow_pickle=True).item()
    int_labels = np.load(small.root / "labels" / "cls_labels_int.npy", allow_pickle=True).item()
    assert set(labels) == set(small.train_ids + small.val_ids)
    assert set(int_labels) == {int(i.replace("_", "")) for i in labels}
    for image_id, flags in labels.items():
        assert flags.dtype == np.float32
        assert flags.shape == (20,)
        present = {c for c in np.unique(_gt(small, image_id)) if 0 < c < 255}
        assert {i + 1 for i in np.flatnonzero(flags)} == present
        assert np.array_equal(int_labels[int(image_id.replace("_", ""))], flags)


def test_seam_is_worse_than_eps(small: ToyDataset) -> None:
    gts = [_gt(small, i) for i in small.train_ids]
    seam = [np.asarray(_png(small, "pseudo_seam", i)) for i in small.train_ids]
    eps = [np.asarray(_png(small, "pseudo_eps", i)) for i in small.train_ids]
    miou_seam, miou_eps = _miou(gts, seam), _miou(gts, eps)
    assert miou_seam < miou_eps < 1.0
    assert miou_seam == pytest.approx(small.summary["miou_seam"], abs=1e-9)
    assert miou_eps == pytest.approx(small.summary["miou_eps"], abs=1e-9)
    # the same figure from torchmetrics, which averages over present classes as VOC does
    metric = MulticlassJaccardIndex(num_classes=21, ignore_index=255, average="macro")
    for gt, pred in zip(gts, eps, strict=True):
        metric.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)))
    assert float(metric.compute()) == pytest.approx(miou_eps, abs=1e-5)
    # imperfect on every image, not only on average
    for gt, pred in zip(gts, seam, strict=True):
        assert (pred[gt != 255] != gt[gt != 255]).any()


def test_same_seed_same_bytes_other_seed_other_data(small: ToyDataset, tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    again = make_toy(tmp_path / "again", n_train=N_TRAIN, n_val=N_VAL, seed=0)
    assert files(again.root) == files(small.root)
    assert again.summary == small.summary
    other = make_toy(tmp_path / "other", n_train=N_TRAIN, n_val=N_VAL, seed=1)
    other_files, toy_files = files(other.root), files(small.root)
    for image_id in small.train_ids:
        for rel in (f"VOC2012/SegmentationClass/{image_id}.png", f"labels/pseudo_eps/{image_id}.png"):
            assert other_files[rel] != toy_files[rel]
    assert other_files["labels/points.json"] != toy_files["labels/points.json"]
    # image i draws from its own stream: a smaller toy of the same seed starts with the same images,
    # whether they fall in its train or its val split
    fewer = make_toy(tmp_path / "fewer", n_train=2, n_val=1, seed=0)
    assert fewer.train_ids + fewer.val_ids == (small.train_ids + small.val_ids)[:3]
    for image_id in fewer.train_ids + fewer.val_ids:
        for rel in (f"VOC2012/JPEGImages/{image_id}.jpg", f"VOC2012/SegmentationClass/{image_id}.png"):
            assert (fewer.root / rel).read_bytes() == toy_files[rel]


def test_workspace_file_parses_and_points_at_existing_files(small: ToyDataset) -> None:
    raw = tomllib.loads(small.workspace.read_text())
    assert raw["dataset"] == {
        "root": "VOC2012", "format": "voc", "splits": ["train", "val"], "train_split": "train", "val_split": "val",
        "num_classes": len(CLASS_NAMES),
    }  # fmt: skip
    assert raw["paths"] == {"cache": "cache", "runs": "runs"}
    assert list(raw["labels"]) == ["gt", "scribble", "point", "seam", "eps", "vl", "cls"]
    kinds = {name: entry["kind"] for name, entry in raw["labels"].items()}
    assert kinds == {
        "gt": "mask", "scribble": "scribble-xml", "point": "points-json", "seam": "mask", "eps": "mask", "vl": "mask",
        "cls": "cls-labels",
    }  # fmt: skip
    base = small.workspace.parent
    assert (base / raw["dataset"]["root"] / "JPEGImages").is_dir()
    for entry in raw["labels"].values():
        assert (base / entry["path"]).exists()
    assert (base / raw["labels"]["point"]["background"]).is_file()
    ws = Workspace.load(small.workspace)
    assert ws.data_root == small.voc_root.resolve()
    assert set(ws.labels) == set(kinds)


def test_progress_and_bad_counts(tmp_path: Path) -> None:
    calls: list[int] = []
    make_toy(tmp_path / "p", n_train=2, n_val=1, progress=calls.append)
    assert sum(calls) == 3
    with pytest.raises(ConfigError, match="at least 1 train"):
        make_toy(tmp_path / "bad", n_train=0)
