"""Evaluating runs under a protocol and predicting images: files written, runs grouped on one backbone
pass, heads moved between store sizes, weights checked, predictions at the original size."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.names import RunFiles
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.errors import ConfigError, StoreMismatchError
from pipeline.features.data import find_images, load_rgb
from pipeline.features.extract import extract, store_path
from pipeline.inference import evaluate as protocol_eval
from pipeline.inference.evaluate import evaluate_runs, load_for_protocol, protocol_items
from pipeline.inference.predict import load_probs, predict
from pipeline.inference.protocols import PROTOCOLS, Protocol
from pipeline.training.evaluate import evaluate
from pipeline.training.runs import train_and_evaluate
from pipeline.workspace import Workspace

TINY = ExtractConfig(model="vit_tiny_test", random_init=True, size=56, workers=0)
FAST = TrainConfig(lr=2e-2, epochs=1, min_steps=30, batch_size=8)
#: A small "lin": short side 56 and 42-px windows with stride 28, so every image has overlapping windows.
SMALL = Protocol("lin", scale=(2048, 56), ratios=(1.0,), flip=False, crop=42, stride=28)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, toy) -> Workspace:
    """The toy workspace with train/val extracted by the tiny model, last block and blocks 0-2."""
    import shutil

    root = tmp_path_factory.mktemp("inference") / "toy"
    shutil.copytree(toy.root, root)
    w = Workspace.load(root / "ssvt.toml")
    for cfg in (TINY, ExtractConfig(**{**TINY.to_dict(), "layers": "0,1,2"})):
        for split in ("train", "val"):
            extract(find_images(w.data_root, split), store_path(cfg, w.layout, split), cfg)
    return w


@pytest.fixture(scope="module")
def runs(ws, tmp_path_factory) -> list[Path]:
    """Three runs: gt and eps on the last block, gt on blocks 0-2 (another store of the same backbone)."""
    out = tmp_path_factory.mktemp("runs")
    last = store_path(TINY, ws.layout, "train")
    three = store_path(ExtractConfig(**{**TINY.to_dict(), "layers": "0,1,2"}), ws.layout, "train")
    made = []
    for name, labels, store in (("gt", "gt", last), ("eps", "eps", last), ("gt3", "gt", three)):
        train_and_evaluate(FAST, ws.labels[labels], ws, store_path=store, gt=ws.labels["gt"], out=out / name)
        made.append(out / name)
    return made


@pytest.fixture
def small_lin(monkeypatch):
    monkeypatch.setitem(PROTOCOLS, "lin", SMALL)


def test_protocol_writes_its_own_files_and_leaves_the_cached_metrics(ws, runs, small_lin, tmp_path):
    before = RunFiles(runs[0]).metrics.read_text()
    [result] = evaluate_runs([runs[0]], ws.labels["gt"], protocol="lin", workspace=ws, device="cpu", workers=0)
    files = RunFiles(runs[0])
    assert files.metrics.read_text() == before
    metrics = json.loads(files.metrics_for("lin").read_text())
    assert metrics["protocol"] == "lin"
    assert metrics["settings"] == SMALL.to_dict()
    assert metrics["miou"] == pytest.approx(result.result.miou)
    assert set(metrics["per_image_iou"]) == set(ws_val_ids(ws))
    assert files.worst_for("lin").stat().st_size > 0
    assert files.confusion_for("lin").exists()
    np.testing.assert_array_equal(np.load(files.confusion_for("lin")), result.result.confusion)


def ws_val_ids(ws: Workspace) -> list[str]:
    return [item.id for item in find_images(ws.data_root, "val")]


def test_runs_on_one_backbone_share_one_pass(ws, runs, small_lin, monkeypatch):
    windows = []
    real = protocol_eval.evaluate_group

    def spy(members, *args, **kwargs):
        results, n = real(members, *args, **kwargs)
        windows.append((len(members), n))
        return results, n

    monkeypatch.setattr(protocol_eval, "evaluate_group", spy)
    together = evaluate_runs(runs, ws.labels["gt"], protocol="lin", workspace=ws, device="cpu", workers=0)
    alone = [evaluate_runs([r], ws.labels["gt"], protocol="lin", workspace=ws, device="cpu", workers=0)[0] for r in runs]
    assert windows[0][0] == 3  # the two stores (last block, blocks 0-2) share a backbone and its weights
    assert windows[0][1] == windows[1][1]  # one pass for three runs costs the windows of one run
    for a, b in zip(together, alone, strict=True):
        assert a.run_dir == b.run_dir
        assert a.result.miou == pytest.approx(b.result.miou, abs=1e-12)
        np.testing.assert_array_equal(a.result.confusion, b.result.confusion)


def test_head_trained_at_one_size_evaluates_at_another(ws, runs, tmp_path):
    bigger = ExtractConfig(**{**TINY.to_dict(), "size": 112})
    path = tmp_path / "val112.zarr"
    extract(find_images(ws.data_root, "val"), path, bigger)
    small = evaluate(runs[0], ws.labels["gt"])
    large = evaluate(runs[0], ws.labels["gt"], store_path=path)
    assert large.images == small.images
    assert large.miou != small.miou  # other tokens, same head: a real second evaluation
    other_weights = ExtractConfig(**{**TINY.to_dict(), "seed": 1})
    extract(find_images(ws.data_root, "val"), tmp_path / "seed1.zarr", other_weights)
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        evaluate(runs[0], ws.labels["gt"], store_path=tmp_path / "seed1.zarr")
    with pytest.raises(StoreMismatchError, match="layers"):
        evaluate(runs[2], ws.labels["gt"], store_path=store_path(TINY, ws.layout, "val"))


def test_weights_that_differ_from_training_are_refused(ws, runs, small_lin, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs[0], copy)
    config = json.loads((copy / "config.json").read_text())
    config["store"]["identity"]["weights_sha256"] = "0" * 64
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(StoreMismatchError, match="SHA-256 differs"):
        evaluate_runs([copy], ws.labels["gt"], protocol="lin", workspace=ws, device="cpu", workers=0)


def test_items_come_from_the_val_store_or_the_data(ws, runs, tmp_path):
    run = load_for_protocol(runs[0])
    from_store = protocol_items(run, data=None, split="val", workspace=None)
    store = FeatureStore.open(store_path(TINY, ws.layout, "val"))
    assert [i.id for i in from_store] == list(store.ids)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (30, 20)).save(folder / "a.png")
    assert [i.id for i in protocol_items(run, data=folder, split="val", workspace=ws)] == ["a"]
    with pytest.raises(ConfigError, match="no images for split"):
        protocol_items(run, data=None, split="test", workspace=None)


def test_cache_protocol_rejects_protocol_only_options(ws, runs):
    with pytest.raises(ConfigError, match="belong to --protocol cache"):
        evaluate_runs([runs[0]], ws.labels["gt"], protocol="lin", flip_tta=True, workspace=ws)
    with pytest.raises(ConfigError, match="unknown protocol"):
        evaluate_runs([runs[0]], ws.labels["gt"], protocol="nope", workspace=ws)


def test_predict_writes_one_file_per_image_at_the_original_size(ws, runs, small_lin, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"wide": (30, 70), "tall": (64, 33), "tiny": (12, 9)}  # (H, W); no ground truth anywhere
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(photos / f"{name}.png")
    out = tmp_path / "pred"
    summary = predict(runs[0], out, items=find_images(photos), protocol="lin", overlay=True, probs=True, device="cpu", workers=0)
    assert summary.images == 3
    assert summary.failed == []
    for name, (h, w) in sizes.items():
        pred = Image.open(out / f"{name}.png")
        assert pred.mode == "P"
        assert pred.size == (w, h)
        probs, classes = load_probs(out / "probs" / f"{name}.npz")
        assert probs.shape == (21, h, w)
        assert classes[0] == "background"
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=21 / 255)
        top2 = np.sort(probs, axis=0)[-2:]
        clear = top2[1] - top2[0] >= 2 / 255  # quantising cannot swap classes 2 levels apart
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(probs.argmax(0)[clear], np.asarray(pred)[clear])
        overlay = np.asarray(load_rgb(out / "overlay" / f"{name}.png"))
        assert overlay.shape[0] > h  # the image, then the legend band below it
        background = np.asarray(pred) == 0  # left as it is; every other class is tinted
        np.testing.assert_array_equal(overlay[:h, :w][background], np.asarray(load_rgb(photos / f"{name}.png"))[background])


def test_predict_from_the_cache_matches_evaluate_predictions(ws, runs, tmp_path):
    val = store_path(TINY, ws.layout, "val")
    evaluate(runs[0], ws.labels["gt"], save_predictions=tmp_path / "eval")
    predict(runs[0], tmp_path / "pred", store_path=val, protocol="cache", device="cpu")
    for image_id in FeatureStore.open(val).ids:
        a = np.asarray(Image.open(tmp_path / "eval" / f"{image_id}.png"))
        b = np.asarray(Image.open(tmp_path / "pred" / f"{image_id}.png"))
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="--store"):
        predict(runs[0], tmp_path / "x", protocol="cache")


def test_a_workspace_class_list_names_metrics_and_predictions(ws, tmp_path):
    import shutil

    root = tmp_path / "named"
    shutil.copytree(ws.file.parent, root, ignore=shutil.ignore_patterns("cache", "runs"))
    names = [f"thing{i}" for i in range(21)]
    text = (root / "ssvt.toml").read_text().replace("[dataset]", f"[dataset]\nclasses = {json.dumps(names)}", 1)
    (root / "ssvt.toml").write_text(text)
    named = Workspace.load(root / "ssvt.toml")
    assert named.classes == tuple(names)
    for split in ("train", "val"):
        shutil.copytree(store_path(TINY, ws.layout, split), store_path(TINY, named.layout, split))
    out = train_and_evaluate(FAST, named.labels["gt"], named, gt=named.labels["gt"], out=tmp_path / "run")
    assert list(out.evaluation.per_class_iou) == names
    assert json.loads((tmp_path / "run" / "config.json").read_text())["classes"] == names
    assert list(json.loads((tmp_path / "run" / "metrics.json").read_text())["per_class_iou"]) == names
    predict(tmp_path / "run", tmp_path / "pred", store_path=store_path(TINY, named.layout, "val"), protocol="cache", probs=True)
    first = FeatureStore.open(store_path(TINY, named.layout, "val")).ids[0]
    assert load_probs(tmp_path / "pred" / "probs" / f"{first}.npz")[1] == names


# --- a backbone with 16-pixel patches, end to end ----------------------------------------------------


@pytest.fixture(scope="module")
def p16(tmp_path_factory, toy) -> tuple[Workspace, ExtractConfig, Path]:
    """The toy workspace extracted at patch 16 (canvas 64, grid 4 x 4) and a head trained on its gt."""
    import shutil

    root = tmp_path_factory.mktemp("patch16") / "toy"
    shutil.copytree(toy.root, root)
    w = Workspace.load(root / "ssvt.toml")
    cfg = ExtractConfig(model="vit_tiny_test", random_init=True, size=64, overrides={"patch_size": 16}, workers=0)
    for split in ("train", "val"):
        extract(find_images(w.data_root, split), store_path(cfg, w.layout, split), cfg)
    run = root / "runs" / "gt16"
    train_and_evaluate(FAST, w.labels["gt"], w, store_path=store_path(cfg, w.layout, "train"), gt=w.labels["gt"], out=run)
    return w, cfg, run


def test_patch16_store_geometry_and_content_masks(p16):
    from pipeline.cache.geometry import fit_geometry

    w, cfg, _ = p16
    store = FeatureStore.open(store_path(cfg, w.layout, "val"))
    assert (store.patch, store.attrs["patch"], store.size, store.grid) == (16, 16, 64, (4, 4))
    assert store.attrs["extract_config"]["overrides"] == {"patch_size": 16}
    mixed = 0
    for source, geom in zip(store.sources or [], store.geometries(), strict=True):
        height, width = np.asarray(load_rgb(Path(source))).shape[:2]
        assert geom == fit_geometry(height, width, 64)
        blocks = geom.content_mask().reshape(4, 16, 4, 16)  # (row, pixel row, col, pixel col): 16 pixels a token
        np.testing.assert_array_equal(geom.content_mask(grid=4), blocks.any(axis=(1, 3)))
        mixed += int((blocks.any(axis=(1, 3)) & ~blocks.all(axis=(1, 3))).sum())
    assert mixed > 0  # the images are not square: patches holding content and padding exist and count as content


def test_patch16_labels_lie_on_the_64_pixel_canvas(p16):
    from pipeline.cache import label_readers as readers
    from pipeline.cache.geometry import mask_to_canvas
    from pipeline.cache.labels import ensure_labels

    w, cfg, _ = p16
    store = FeatureStore.open(store_path(cfg, w.layout, "train"))
    gt = ensure_labels(w.labels["gt"], store, num_classes=21)
    scribble = ensure_labels(w.labels["scribble"], store, num_classes=21)
    assert (gt.canvas, scribble.canvas) == (64, 64)
    masks, strokes = gt.masks(np.arange(store.n_images)), scribble.masks(np.arange(store.n_images))
    assert masks.shape == strokes.shape == (store.n_images, 64, 64)
    for i, geom in enumerate(store.geometries()):
        expected = mask_to_canvas(readers.read_mask(readers.find_mask(w.labels["gt"].path, store.ids[i])), geom)
        np.testing.assert_array_equal(masks[i], expected)
        outside = ~geom.content_mask()
        assert (masks[i][outside] == 255).all()
        assert (strokes[i][outside] == 255).all()
        padding_patches = ~geom.content_mask(grid=4)
        blocks = masks[i].reshape(4, 16, 4, 16).transpose(0, 2, 1, 3)
        assert (blocks[padding_patches] == 255).all()


def test_patch16_head_trains_and_scores_at_the_original_resolution(p16, small_lin, tmp_path, monkeypatch):
    from pipeline.inference import online

    w, _, run = p16
    config = json.loads((run / "config.json").read_text())
    assert config["store"]["extract_config"]["overrides"] == {"patch_size": 16}
    cached = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= cached["miou"] <= 1.0
    result = evaluate(run, w.labels["gt"], save_predictions=tmp_path / "cache")
    assert result.images == 8
    assert result.miou == pytest.approx(cached["miou"])
    pads = []
    real_pad = online.centre_pad
    monkeypatch.setattr(online, "centre_pad", lambda x, multiple: pads.append(multiple) or real_pad(x, multiple))
    [lin] = evaluate_runs(
        [run], w.labels["gt"], protocol="lin", workspace=w, device="cpu", workers=0, save_predictions=tmp_path / "lin"
    )
    assert 0.0 <= lin.result.miou <= 1.0
    assert lin.result.images == 8
    assert set(pads) == {16}  # the 42-pixel windows are padded to 48, a 3 x 3 grid of 16-pixel patches
    for item in find_images(w.data_root, "val"):
        size = load_rgb(item.path).size
        for protocol in ("cache", "lin"):
            with Image.open(tmp_path / protocol / f"{item.id}.png") as pred:
                assert pred.size == size, (protocol, item.id)
