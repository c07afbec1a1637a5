"""Training and evaluation on the toy data with a tiny random model: the head learns, runs are
reproducible and self-describing, and evaluation lines up with the ground truth at original size."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cache import label_readers as readers
from pipeline.cache.labels import ensure_labels
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.errors import ConfigError, LabelError, StoreMismatchError
from pipeline.features.data import find_images
from pipeline.features.extract import extract, store_path
from pipeline.training.evaluate import evaluate, load_run, score_head
from pipeline.training.metrics import ConfusionMatrix
from pipeline.training.runs import train_and_evaluate
from pipeline.workspace import Workspace

TINY = ExtractConfig(model="vit_tiny_test", random_init=True, size=112, workers=0, flip=True)
FAST = TrainConfig(lr=2e-2, epochs=1, min_steps=60, batch_size=8)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, toy) -> Workspace:
    """A copy of the toy workspace with train and val extracted by the tiny model."""
    import shutil

    root = tmp_path_factory.mktemp("ws") / "toy"
    shutil.copytree(toy.root, root)
    w = Workspace.load(root / "ssvt.toml")
    for split in ("train", "val"):
        extract(find_images(w.data_root, split), store_path(TINY, w.layout, split), TINY)
    return w


def constant_miou(w: Workspace) -> float:
    """mIoU of predicting background everywhere, at original resolution (the floor to beat)."""
    cm = ConfusionMatrix(21)
    for item in find_images(w.data_root, "val"):
        gt = readers.read_mask(readers.find_mask(w.labels["gt"].path, item.id))
        cm.update(np.zeros_like(gt), gt)
    return float(cm.miou())


def test_head_on_ground_truth_beats_constant_predictor(ws, tmp_path):
    out = train_and_evaluate(FAST, ws.labels["gt"], ws, gt=ws.labels["gt"], out=tmp_path / "run")
    assert out.evaluation is not None
    floor = constant_miou(ws)
    assert out.evaluation.miou > floor + 0.15, (out.evaluation.miou, floor)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("miou", "per_class_iou", "pixel_accuracy", "epochs", "wall_time"):
        assert key in metrics
    assert metrics["miou"] == pytest.approx(out.evaluation.miou)
    for name in ("head.safetensors", "config.json", "curve.png", "train.log", "confusion.npy", "confusion.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["store"]["fingerprint"] == FeatureStore.open(store_path(TINY, ws.layout, "train")).fingerprint()
    assert len(cfg["labels"]["fingerprint"]) == 64
    assert "validation mIoU" in (tmp_path / "run" / "train.log").read_text()


def test_training_is_reproducible_and_streaming_matches_memory(ws, tmp_path):
    cfg = TrainConfig(lr=2e-2, epochs=2, min_steps=0, batch_size=4, flip=False)
    a = train_and_evaluate(cfg, ws.labels["eps"], ws, out=tmp_path / "a")
    b = train_and_evaluate(cfg, ws.labels["eps"], ws, out=tmp_path / "b")
    assert a.train.history["loss"] == b.train.history["loss"]
    stream = train_and_evaluate(TrainConfig(**{**cfg.to_dict(), "memory": "stream"}), ws.labels["eps"], ws, out=tmp_path / "s")
    assert not stream.train.in_memory
    assert a.train.in_memory
    assert stream.train.steps == a.train.steps
    # Streaming shuffles within shards, so the order differs; it must still learn.
    assert np.mean(stream.train.history["loss"][-3:]) < stream.train.history["loss"][0]


def mmcv_lr(i: int, base_lr: float, total: int, warmup: int, power: float, warmup_ratio: float = 1e-6) -> float:
    """The rate of iteration ``i`` (iterations done) under mmcv's PolyLrUpdaterHook with warmup="linear",
    min_lr=0, by_epoch=False, written out here from mmcv's formulas, independently of ssvt."""
    regular = (base_lr - 0.0) * (1 - i / total) ** power + 0.0
    if i >= warmup:
        return regular
    k = (1 - i / warmup) * (1 - warmup_ratio)
    return regular * (1 - k)


@pytest.mark.parametrize("power", [1.0, 0.9])
def test_poly_schedule_is_mmcv_poly_with_linear_warmup_at_every_step(power):
    from pipeline.training.train import lr_lambda

    total, warm, base = 100, 15, 1e-3
    param = torch.nn.Parameter(torch.zeros(1))
    optim = torch.optim.AdamW([param], lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda("poly", total, warm, power))
    used = []
    for _ in range(total):  # the rate each optimiser step runs with, as in train_head
        used.append(optim.param_groups[0]["lr"])
        optim.step()
        sched.step()
    assert used == pytest.approx([mmcv_lr(i, base, total, warm, power) for i in range(total)], rel=1e-12, abs=0)
    factor = lr_lambda("poly", total, warm, power)
    assert factor(0) == pytest.approx(1e-6)  # warmup_ratio x poly(0) = 1e-6 x 1
    assert factor(1) == pytest.approx((1 - (14 / 15) * (1 - 1e-6)) * 0.99**power)
    assert factor(14) == pytest.approx((1 - (1 / 15) * (1 - 1e-6)) * 0.86**power)  # last warm-up step
    assert factor(15) == pytest.approx(0.85**power)  # warm-up over: the plain poly factor
    assert factor(99) == pytest.approx(0.01**power)
    assert factor(100) == 0.0


def test_cosine_schedule_decays_over_all_steps_with_the_same_warmup():
    from pipeline.training.train import lr_lambda

    factor = lr_lambda("cosine", 100, 15)
    for i in range(101):
        cosine = 0.5 * (1 + math.cos(math.pi * i / 100))
        warm = 1 - (1 - i / 15) * (1 - 1e-6) if i < 15 else 1.0
        assert factor(i) == pytest.approx(cosine * warm, rel=1e-12, abs=1e-15), i


def test_iterations_run_exactly_that_many_steps_on_the_configured_schedule(ws, tmp_path):
    cfg = TrainConfig(lr=2e-2, iterations=13, warmup_iters=4, poly_power=0.9, batch_size=8, flip=False)
    out = train_and_evaluate(cfg, ws.labels["gt"], ws, out=tmp_path / "run")
    images = out.train.images
    assert out.train.steps == 13
    assert out.train.epochs == math.ceil(13 / math.ceil(images / 8))  # passes made, the last one cut short
    assert out.train.history["lr"] == pytest.approx([mmcv_lr(i, 2e-2, 13, 4, 0.9) for i in range(13)], rel=1e-9)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert TrainConfig.from_dict(saved["train"]) == cfg
    assert saved["result"]["steps"] == 13


@pytest.mark.parametrize("name", ["scribble", "point", "seam", "vl"])
def test_every_label_type_trains(ws, tmp_path, name):
    out = train_and_evaluate(FAST, ws.label_source(name), ws, gt=ws.labels["gt"], out=tmp_path / name)
    assert out.evaluation is not None
    assert out.evaluation.miou > constant_miou(ws)
    assert np.isfinite(out.train.history["loss"]).all()


def test_saved_predictions_line_up_with_ground_truth(ws, tmp_path):
    train_and_evaluate(FAST, ws.labels["gt"], ws, out=tmp_path / "run")
    val = FeatureStore.open(store_path(TINY, ws.layout, "val"))
    result = evaluate(tmp_path / "run", ws.labels["gt"], store_path=val.path, save_predictions=tmp_path / "pred")
    cm = ConfusionMatrix(21)
    for image_id in val.ids:
        pred = Image.open(tmp_path / "pred" / f"{image_id}.png")
        gt = readers.read_mask(readers.find_mask(ws.labels["gt"].path, image_id))
        assert pred.mode == "P"
        assert pred.size == (gt.shape[1], gt.shape[0])
        cm.update(np.asarray(pred), gt)
    # The metric recomputed from the written PNGs is the reported one: same pixels, same alignment.
    np.testing.assert_array_equal(cm.matrix, result.confusion)
    # Shifting predictions by a few pixels makes them worse: they are aligned, not just similar.
    shifted = ConfusionMatrix(21)
    for image_id in val.ids:
        pred = np.roll(np.asarray(Image.open(tmp_path / "pred" / f"{image_id}.png")), 6, axis=1)
        shifted.update(pred, readers.read_mask(readers.find_mask(ws.labels["gt"].path, image_id)))
    assert shifted.miou() < cm.miou()


def test_flip_tta_and_store_mismatch(ws, tmp_path):
    train_and_evaluate(FAST, ws.labels["gt"], ws, out=tmp_path / "run")
    tta = evaluate(tmp_path / "run", ws.labels["gt"], flip_tta=True)
    plain = evaluate(tmp_path / "run", ws.labels["gt"])
    assert tta.flip_tta
    assert tta.miou != plain.miou
    assert tta.miou > constant_miou(ws)
    other = ExtractConfig(model="vit_tiny_test", random_init=True, size=56, workers=0, seed=1)
    extract(find_images(ws.data_root, "val"), tmp_path / "other.zarr", other)
    with pytest.raises(StoreMismatchError, match=r"weights_sha256: run has '[0-9a-f]+', store has '[0-9a-f]+'"):
        evaluate(tmp_path / "run", ws.labels["gt"], store_path=tmp_path / "other.zarr")
    head, _ = load_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="no flipped view"):
        score_head(head, FeatureStore.open(tmp_path / "other.zarr"), ws.labels["gt"], flip_tta=True)


def test_class_count_mismatch_and_bad_labels(ws, tmp_path):
    train_and_evaluate(FAST, ws.labels["gt"], ws, out=tmp_path / "run")
    head, _ = load_run(tmp_path / "run")
    assert head.num_classes == 21
    store = FeatureStore.open(store_path(TINY, ws.layout, "train"))
    with pytest.raises(LabelError, match="image-level"):
        train_and_evaluate(FAST, ws.labels["cls"], ws, out=tmp_path / "cls")
    # A 5-class head cannot take VOC labels with classes up to 20.
    labels = ensure_labels(ws.labels["gt"], store, num_classes=21)
    from pipeline.training.train import train_head

    with pytest.raises(LabelError, match="not a class of a 5-class head"):
        train_head(store, labels, FAST, tmp_path / "five", num_classes=5)
    assert not (tmp_path / "five" / "head.safetensors").exists()


def test_sparse_and_subsampled_dense_runs_use_the_cheap_loss(ws, tmp_path, monkeypatch):
    import pipeline.training.train as train

    calls = []
    for name in ("dense_loss", "sparse_loss", "subsampled_dense_loss"):
        real = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    cfg = TrainConfig(lr=1e-2, epochs=1, min_steps=0, batch_size=8)
    train_and_evaluate(cfg, ws.labels["scribble"], ws, out=tmp_path / "s")
    train_and_evaluate(TrainConfig(**{**cfg.to_dict(), "pixels_per_image": 500}), ws.labels["gt"], ws, out=tmp_path / "p")
    train_and_evaluate(cfg, ws.labels["gt"], ws, out=tmp_path / "d")
    assert calls == ["sparse_loss"] * 2 + ["subsampled_dense_loss"] * 2 + ["dense_loss"] * 2


def test_evaluate_matches_brute_force_metric(ws, tmp_path):
    """The split mIoU equals one computed here from the head's own logits, image by image."""
    from pipeline.resample import canvas_to_original

    train_and_evaluate(FAST, ws.labels["gt"], ws, out=tmp_path / "run")
    head, _ = load_run(tmp_path / "run")
    val = FeatureStore.open(store_path(TINY, ws.layout, "val"))
    result = score_head(head, val, ws.labels["gt"])
    inter, union = np.zeros(21), np.zeros(21)
    for i, g in enumerate(val.geometries()):
        with torch.inference_mode():
            logits = head(torch.from_numpy(val.read_tokens(i, i + 1, view=0)))[0]
        pred = canvas_to_original(logits, g).argmax(0).numpy()
        gt = readers.read_mask(readers.find_mask(ws.labels["gt"].path, val.ids[i]))
        keep = gt != 255
        for c in range(21):
            p, t = (pred == c) & keep, (gt == c) & keep
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
    present = union > 0
    assert result.miou == pytest.approx((inter[present] / union[present]).mean())


def test_run_folder_default_names_do_not_overwrite(ws):
    a = train_and_evaluate(TrainConfig(epochs=1, min_steps=2, batch_size=8), ws.labels["seam"], ws)
    b = train_and_evaluate(TrainConfig(epochs=1, min_steps=2, batch_size=8), ws.labels["seam"], ws)
    assert a.run_dir == ws.runs_dir / "seam-bn-linear"
    assert b.run_dir == ws.runs_dir / "seam-bn-linear-2"
    assert Path(a.run_dir / "head.safetensors").exists()
    assert Path(b.run_dir / "head.safetensors").exists()


def test_in_memory_features_equal_the_store_for_any_index_set(ws):
    from pipeline.training.train import FeatureBatches

    store = FeatureStore.open(store_path(TINY, ws.layout, "train"))
    indices = np.array([0, 1, 2, 5, 6, 9, 10, 11, 12, 13, 14, 15])  # runs longer and shorter than a read
    batches = FeatureBatches(store, indices, 4, torch.device("cpu"), in_memory=True)
    assert batches.tokens is not None
    np.testing.assert_array_equal(batches.tokens.numpy(), store.read_tokens(0, store.n_images)[indices])
    seen = [int(p) for pos, _ in batches.epoch(torch.Generator().manual_seed(0)) for p in pos]
    assert sorted(seen) == list(range(len(indices)))


@pytest.mark.parametrize("batch_size", [1, 3, 5, 16, 40])
def test_streamed_batches_cover_the_training_images_with_the_right_tokens(ws, tmp_path, batch_size):
    from pipeline.training.train import FeatureBatches

    small = ExtractConfig(**{**TINY.to_dict(), "images_per_shard": 3})  # batches must span shards
    path = tmp_path / "s.zarr"
    extract(find_images(ws.data_root, "train"), path, small)
    store = FeatureStore.open(path)
    indices = np.array([0, 2, 3, 4, 7, 8, 9, 12, 15])
    batches = FeatureBatches(store, indices, batch_size, torch.device("cpu"), in_memory=False)
    every = store.read_tokens(0, store.n_images)
    seen, sizes = [], []
    for pos, tokens in batches.epoch(torch.Generator().manual_seed(3)):
        np.testing.assert_array_equal(tokens.numpy(), every[indices[pos.numpy()]])
        seen += pos.tolist()
        sizes.append(len(pos))
    assert sorted(seen) == list(range(len(indices)))
    assert all(size == batch_size for size in sizes[:-1])


def test_evaluating_a_head_with_fewer_classes_than_the_ground_truth_names_the_file(ws):
    from pipeline.heads import build_head

    val = FeatureStore.open(store_path(TINY, ws.layout, "val"))
    head = build_head("bn-linear", val.channels, 5).eval()
    with pytest.raises(LabelError, match=r"\.png holds classes \[.*\] but the head predicts 5 classes"):
        score_head(head, val, ws.labels["gt"])


# --- experiment logs: metrics.csv, config.json's environment, TensorBoard --------------------------

TINY_RUN = TrainConfig(lr=2e-2, iterations=9, warmup_iters=2, batch_size=8, device="cpu")


def read_metrics_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_metrics_csv_rows_are_the_history_step_by_step(ws, tmp_path):
    out = train_and_evaluate(TrainConfig(lr=2e-2, epochs=2, min_steps=0, batch_size=6), ws.labels["gt"], ws, out=tmp_path / "run")
    header, rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert header == ["step", "epoch", "loss", "lr"] == list(history)
    assert len(rows) == out.train.steps == len(history["step"])
    for key in header:  # floats are written with repr: they read back exactly
        assert [float(r[key]) for r in rows] == history[key] == out.train.history[key], key
    assert [int(r["step"]) for r in rows] == list(range(1, out.train.steps + 1))
    epochs = [int(r["epoch"]) for r in rows]
    assert epochs == sorted(epochs)
    assert epochs[0] == 1
    assert epochs[-1] == out.train.epochs == 2


def test_metrics_csv_keeps_the_rows_of_a_run_that_crashes(ws, tmp_path):
    from pipeline.training.train import train_head

    store = FeatureStore.open(store_path(TINY, ws.layout, "train"))
    labels = ensure_labels(ws.labels["gt"], store, num_classes=21)

    def crash_at_step_5(step: int, total: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_head(store, labels, TINY_RUN, tmp_path / "run", num_classes=21, progress=crash_at_step_5)
    _, rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert not (tmp_path / "run" / "head.safetensors").exists()


def test_config_json_records_command_versions_device_and_commit(ws, tmp_path, monkeypatch):
    import re
    import sys
    from importlib import metadata

    monkeypatch.setattr(sys, "argv", ["ssvt", "train-head", "--labels", "gt", "--out", "my runs/a"])
    train_and_evaluate(TINY_RUN, ws.labels["gt"], ws, out=tmp_path / "run")
    env = json.loads((tmp_path / "run" / "config.json").read_text())["environment"]
    assert env["command"] == "ssvt train-head --labels gt --out 'my runs/a'"
    for name in ("ssvt", "torch", "transformers", "zarr", "numpy"):
        assert env["versions"][name] == metadata.version(name), name
    assert env["device"] == "cpu"
    commit, dirty = env["git"]["commit"], env["git"]["dirty"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert dirty is None if commit is None else isinstance(dirty, bool)


def test_git_state_is_none_outside_the_package_checkout_and_on_any_git_failure(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from pipeline import provenance

    package = tmp_path / "repo" / "lib" / "pipeline"
    package.mkdir(parents=True)
    unknown = {"commit": None, "dirty": None}
    assert provenance.git_state(package) == unknown  # not a repository at all
    if shutil.which("git"):  # a repository whose top level is not the folder holding the package
        subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
        assert provenance.git_state(package) == unknown

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance.git_state() == unknown
    monkeypatch.setattr(provenance.sys, "argv", [])
    assert provenance.command_line() is None


def test_tensorboard_flag_writes_the_history_and_final_metrics_as_scalars(ws, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.chdir(ws.file.parent)
    args = ["train-head", "--labels", "gt", "--iterations", "9", "--warmup-iters", "2", "--batch-size", "8",
            "--lr", "0.02", "--device", "cpu", "--tensorboard", "--out", str(tmp_path / "run")]  # fmt: skip
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"tensorboard --logdir {tmp_path / 'run' / 'tb'}" in result.output
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["train"]["tensorboard"] is True
    history = json.loads((run / "history.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "val/miou", "val/pixel_accuracy"}
    for key in ("loss", "lr"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == history["step"]
        assert [s.value for s in scalars] == pytest.approx(history[key], rel=1e-6)  # stored as float32
    for key in ("miou", "pixel_accuracy"):
        (final,) = events.Scalars(f"val/{key}")
        assert final.step == 9
        assert final.value == pytest.approx(metrics[key], rel=1e-6)


def test_without_tensorboard_the_flag_is_one_clear_error_before_any_write(ws, tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.training.train import train_head

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails as if not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)  # so torch imports it again
    cfg = TrainConfig(**{**TINY_RUN.to_dict(), "tensorboard": True})
    with pytest.raises(ConfigError, match=r"--tensorboard needs the tensorboard package.*: pip install tensorboard$"):
        train_and_evaluate(cfg, ws.labels["gt"], ws, out=tmp_path / "run")
    store = FeatureStore.open(store_path(TINY, ws.layout, "train"))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train_head(store, ensure_labels(ws.labels["gt"], store, num_classes=21), cfg, tmp_path / "run", num_classes=21)
    monkeypatch.chdir(ws.file.parent)
    result = CliRunner().invoke(app, ["train-head", "--labels", "gt", "--tensorboard", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: --tensorboard needs the tensorboard package")
    assert lines[0].endswith("pip install tensorboard")
    assert not (tmp_path / "run").exists()


def test_stage_two_does_not_import_tensorboard(modules_loaded_by):
    code = "import pipeline.cli, pipeline.training.train, pipeline.training.runs, pipeline.provenance"
    assert modules_loaded_by(code, "tensorboard", "torch.utils.tensorboard") == []
    assert "tensorboard" in modules_loaded_by("import torch.utils.tensorboard", "tensorboard")


def test_heads_trained_in_one_pass_equal_separate_runs(ws, tmp_path):
    """train_heads reads each batch once for several heads; every head, its history and its run files
    equal those of a separate train_head call with the same settings, bit for bit."""
    from safetensors.torch import load_file

    from pipeline.training.train import HeadJob, fuse_key, train_head, train_heads

    store = FeatureStore.open(store_path(TINY, ws.layout, "train"))
    base = TrainConfig(lr=2e-2, epochs=2, min_steps=12, batch_size=6)
    # Dense labels on random pixels draw from each head's own stream, so they share the pass too.
    specs = [
        ("gt", "bn-linear", 1e-2, None),
        ("eps", "linear", 2e-2, 40),
        ("scribble", "mlp", 5e-3, None),
        ("eps", "conv", 2e-2, 60),
    ]
    jobs = []
    for name, head, lr, pixels in specs:
        labels = ensure_labels(ws.labels[name], store, num_classes=21)
        cfg = TrainConfig(**{**base.to_dict(), "labels": name, "head": head, "lr": lr, "pixels_per_image": pixels})
        jobs.append(HeadJob(labels, cfg, tmp_path / "fused" / f"{name}-{head}"))
    assert len({fuse_key(store, job) for job in jobs}) == 1
    fused = train_heads(store, jobs, num_classes=21)
    for job, result in zip(jobs, fused, strict=True):
        alone = train_head(store, job.labels, job.cfg, tmp_path / "alone" / job.run_dir.name, num_classes=21)
        assert alone.history == result.history
        a, b = load_file(str(job.run_dir / "head.safetensors")), load_file(str(alone.run_dir / "head.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        assert json.loads((job.run_dir / "config.json").read_text())["result"]["heads_in_pass"] == 4
    other = HeadJob(jobs[0].labels, TrainConfig(**{**base.to_dict(), "batch_size": 5}), tmp_path / "b5")
    with pytest.raises(ConfigError, match="cannot share a pass"):
        train_heads(store, [jobs[0], other], num_classes=21)
