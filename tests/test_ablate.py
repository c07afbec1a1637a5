"""ssvt ablate and score-labels: the grid's tables come from its cells, a killed grid resumes without
retraining, a failing cell does not stop the others, label quality against independent computations."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import label_readers as readers
from pipeline.cache.labels import LabelSet, ensure_labels
from pipeline.cache.store import FeatureStore
from pipeline.cli.ablation import train_overrides
from pipeline.config import AblateConfig, ExtractConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.features.extract import store_path
from pipeline.training.ablate import mean_std, run_ablation
from pipeline.training.label_quality import score_labels
from pipeline.training.metrics import ConfusionMatrix
from pipeline.workspace import Workspace

TINY = ExtractConfig(model="vit_tiny_test", random_init=True, size=56, workers=0)
QUICK = TrainConfig(lr=2e-2, epochs=1, min_steps=8, batch_size=8)


@pytest.fixture(scope="module")
def ws(toy_with_empty_labels) -> Workspace:
    """The toy workspace, extracted by the tiny model, plus a label source that labels nothing."""
    return toy_with_empty_labels("ablate", TINY)


def test_tables_are_the_cells_own_metrics(ws):
    cfg = AblateConfig(name="t1", labels=("eps", "empty"), heads=("linear", "bn-linear"), seeds=2, train=QUICK)
    grid = run_ablation(cfg, ws, gt=ws.labels["gt"])
    cell = "empty-{}-vit_tiny_test-56-last-random-seed{}"
    assert sorted(f["cell"] for f in grid.failed) == sorted(cell.format(h, s) for h in ("linear", "bn-linear") for s in (0, 1))
    assert all("labels none" in f["error"] for f in grid.failed)
    assert len(grid.rows) == 4  # the failing label set's cells are reported, the others finished
    with grid.files.results_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    per_cell = {}
    for row in rows:
        metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
        assert float(row["miou"]) == pytest.approx(metrics["miou"], rel=1e-12)
        assert float(row["pixel_accuracy"]) == pytest.approx(metrics["pixel_accuracy"], rel=1e-12)
        assert float(row["iou_background"]) == pytest.approx(metrics["per_class_iou"]["background"], rel=1e-12)
        per_cell.setdefault((row["labels"], row["head"]), []).append(metrics["miou"])
    assert json.loads(grid.files.results_json.read_text())[0]["miou"] == pytest.approx(float(rows[0]["miou"]))
    table = grid.files.table_md.read_text()
    assert table == grid.table
    for (labels, head), values in per_cell.items():
        mean, std = 100 * np.mean(values), 100 * np.std(values, ddof=1)
        line = next(line for line in table.splitlines() if line.startswith(f"| {labels} |"))
        column = ["linear", "bn-linear"].index(head) + 1
        assert line.split("|")[column + 1].strip() == f"{mean:.1f} ± {std:.1f}"
    assert "labels themselves" in table.splitlines()[2]
    assert grid.files.table_png.stat().st_size > 0


def test_mean_std_is_numpy_with_one_degree_of_freedom():
    values = [0.71, 0.74, 0.70]
    assert mean_std(values) == pytest.approx((np.mean(values), np.std(values, ddof=1)))
    assert mean_std([0.5]) == (0.5, 0.0)


def _ablate(ws: Workspace, name: str) -> list[str]:
    """``ssvt ablate`` of a 2 labels x 2 seeds grid in a fresh interpreter."""
    return [sys.executable, "-c", "from pipeline.cli import app; app()",
        "ablate", "--name", name, "--labels", "gt,eps", "--heads", "linear", "--seeds", "2",
        "--epochs", "1", "--min-steps", "20", "--lr", "0.02", "--batch-size", "8", "--config", str(ws.file),
    ]  # fmt: skip


def test_a_killed_grid_resumes_without_retraining(ws, tmp_path):
    cmd = _ablate(ws, "killed")
    cells = ws.layout.ablation_dir("killed") / "cells"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(cells.glob("*/metrics.json")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in cells.glob("*/metrics.json")}
    assert 1 <= len(finished) < 4, "the grid finished or never started before the kill"
    heads = {name: (cells / name / "head.safetensors").read_bytes() for name in finished}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert f"{4 - len(finished)} trained now, {len(finished)} done before" in out
    for name, mtime in finished.items():
        assert (cells / name / "metrics.json").stat().st_mtime_ns == mtime
        assert (cells / name / "head.safetensors").read_bytes() == heads[name]
    subprocess.run(_ablate(ws, "whole"), capture_output=True, text=True, check=True)
    killed_table = (ws.layout.ablation_dir("killed") / "table.md").read_text()
    assert killed_table == (ws.layout.ablation_dir("whole") / "table.md").read_text()
    assert re.search(r"\| eps \| \d+\.\d ± \d+\.\d \|", killed_table)


def test_other_training_settings_need_another_grid(ws):
    run_ablation(AblateConfig(name="t3", labels=("gt",), heads=("linear",), train=QUICK), ws, gt=ws.labels["gt"])
    other = AblateConfig(name="t3", labels=("gt",), heads=("linear",), train=TrainConfig(lr=1e-3, epochs=1, min_steps=8))
    with pytest.raises(ConfigError, match=r"other settings.*lr"):
        run_ablation(other, ws, gt=ws.labels["gt"])


def test_ablate_config_and_train_options():
    with pytest.raises(ConfigError, match="average over heads"):
        AblateConfig(labels=("gt", "eps"), heads=("linear", "mlp"), rows="labels", cols="seeds")
    with pytest.raises(ConfigError, match="unknown head"):
        AblateConfig(heads=("nope",))
    cfg = AblateConfig(labels=("gt",), train=TrainConfig(iterations=5))
    assert AblateConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    parsed = train_overrides(
        ["--lr", "0.01", "--iterations", "200", "--no-flip", "--warmup-iters", "5", "--pixels-per-image", "none"]
    )
    assert parsed == {"lr": 0.01, "iterations": 200, "flip": False, "warmup_iters": 5, "pixels_per_image": None}
    with pytest.raises(ConfigError, match="unknown option '--bogus'"):
        train_overrides(["--bogus", "1"])
    with pytest.raises(ConfigError, match="takes a int"):
        train_overrides(["--iterations", "many"])


def _brute_dense(ws: Workspace, name: str, ids: list[str]) -> tuple[float, float]:
    """mIoU and coverage of a dense label folder against GT at the original resolution, written out."""
    cm, labelled, pixels = ConfusionMatrix(21), 0, 0
    for image_id in ids:
        label = readers.read_mask(readers.find_mask(ws.labels[name].path, image_id))
        gt = readers.read_mask(readers.find_mask(ws.labels["gt"].path, image_id))
        keep = label != 255
        cm.update(label[keep], gt[keep])
        labelled, pixels = labelled + keep.sum(), pixels + keep.size
    return cm.miou(), labelled / pixels


def test_score_labels_against_brute_force_and_make_toy(ws, toy):
    store = FeatureStore.open(store_path(TINY, ws.layout, "train"))
    for name in ("eps", "seam", "vl"):
        labels = ensure_labels(ws.labels[name], store, num_classes=21)
        quality = score_labels(labels, store, ws.labels["gt"], source=ws.labels[name])
        miou, coverage = _brute_dense(ws, name, list(store.ids))
        assert quality.resolution == "original"
        assert quality.miou == pytest.approx(miou, rel=1e-12)
        assert quality.miou == pytest.approx(toy.summary[f"miou_{name}"], rel=1e-12)
        assert quality.coverage == pytest.approx(coverage, rel=1e-12)
        assert LabelSet.open(labels.path).attrs["quality"]["miou"] == pytest.approx(miou)  # for ssvt info
    scribbles = ensure_labels(ws.labels["scribble"], store, num_classes=21)
    quality = score_labels(scribbles, store, ws.labels["gt"], source=ws.labels["scribble"])
    assert quality.resolution == "canvas"
    assert quality.miou is None
    # Precision per class on the canvas, brute force: labelled pixels of class c whose GT (on the canvas) is c.
    from pipeline.cache.geometry import mask_to_canvas

    hits, given = np.zeros(21), np.zeros(21)
    geoms = store.geometries()
    for i, image_id in enumerate(store.ids):
        label = scribbles.masks(np.array([i]))[0]
        gt = mask_to_canvas(readers.read_mask(readers.find_mask(ws.labels["gt"].path, image_id)), geoms[i])
        keep = (label != 255) & (gt != 255)
        np.add.at(given, label[keep], 1)
        np.add.at(hits, label[keep & (label == gt)], 1)
    for c, name in enumerate(quality.precision):
        expected = hits[c] / given[c] if given[c] else None
        assert quality.precision[name] == (pytest.approx(expected) if expected is not None else None)
