"""The CLI at two levels: flags reach the library as the right config, and real end-to-end runs."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pipeline.features.extract
from pipeline.cache.store import FeatureStore
from pipeline.cli import app
from pipeline.config import ExtractConfig

runner = CliRunner()
TINY = ["--model", "vit_tiny_test", "--random-init", "--size", "56", "--workers", "0"]


def ok(args: list[str]):
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_help_lists_commands():
    out = ok(["--help"]).output
    for cmd in ("extract", "train-head", "evaluate", "kmeans-viz", "demo", "make-toy", "init", "info"):
        assert cmd in out


def test_extract_flags_become_config(toy_copy, monkeypatch):
    seen = {}

    def fake(items, out, cfg, **kw):
        seen.setdefault("calls", []).append((len(items), Path(out), cfg))
        seen["backbone"] = kw["backbone"]
        raise SystemExit(0)

    monkeypatch.setattr(pipeline.features.extract, "extract", fake)
    monkeypatch.setattr(pipeline.features.extract, "load_backbone", lambda cfg: seen.setdefault("loaded", cfg))
    monkeypatch.chdir(toy_copy)
    runner.invoke(app, ["extract", "--model", "dinov2_vitb14", "--size", "224", "--layers", "last4", "--flip",
                        "--batch-size", "4", "--device", "cpu", "--split", "val"])  # fmt: skip
    n, out, cfg = seen["calls"][0]
    assert n == 8
    assert out == toy_copy / "cache" / "dinov2_vitb14-224-last4" / "val.zarr"
    assert cfg == ExtractConfig(model="dinov2_vitb14", size=224, layers="last4", flip=True, batch_size=4, device="cpu")
    assert seen["loaded"] == cfg  # the backbone is loaded once, before the splits, and passed on
    assert seen["backbone"] is seen["loaded"]


def test_errors_are_one_red_line(toy_copy, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["extract", "--size", "450"])
    assert result.exit_code == 1
    assert "multiple of 14" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 1
    assert "--data" in result.output
    result = runner.invoke(app, ["extract", "--data", str(toy_copy / "VOC2012"), "--split", "val", "--out", "x.zarr"])
    assert result.exit_code == 1
    assert "weights" in result.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(
        app, ["extract", *TINY, "--data", str(toy_copy / "VOC2012"), "--split", "val", "--out", str(blocker / "s.zarr")]
    )
    assert result.exit_code == 1
    assert "error:" in result.output


def test_end_to_end_from_make_toy_to_evaluate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok(["make-toy", "data", "--n-train", "10", "--n-val", "4"])
    monkeypatch.chdir(tmp_path / "data")
    ok(["extract", *TINY, "--flip"])
    store = Path("cache/vit_tiny_test-56-last-random/train.zarr")
    assert FeatureStore.open(store).is_complete()
    out = ok(["train-head", "--labels", "eps", "--min-steps", "20", "--lr", "0.01"]).output
    assert "mIoU" in out
    assert "aeroplane" in out
    metrics = json.loads(Path("runs/eps-bn-linear/metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1
    out = ok(["evaluate", "runs/eps-bn-linear", "--flip-tta", "--save-predictions", "pred"]).output
    assert "flip TTA" in out
    assert len(list(Path("pred").glob("*.png"))) == 4
    out = ok(["info", str(store)]).output
    assert "vit_tiny_test" in out
    assert "eps" in out
    assert "yes" in out
    ok(["kmeans-viz", "--k", "2,3", "--n", "2", "--out", "km"])
    assert Path("km/kmeans.png").exists()
    assert Path("km/kmeans.pdf").exists()
    # Rerunning extract resumes (nothing to do); other settings are refused with the differences named.
    assert "0 / 1" in ok(["extract", *TINY, "--flip", "--split", "val"]).output  # 0 written, 1 already done
    bad = runner.invoke(app, ["extract", *TINY, "--split", "val", "--out", "cache/vit_tiny_test-56-last-random/val.zarr"])
    assert bad.exit_code == 1
    assert "views" in bad.output
    assert "--overwrite" in bad.output


def test_init_writes_a_loadable_workspace(tmp_path, monkeypatch):
    from pipeline.config import Workspace

    monkeypatch.chdir(tmp_path)
    ok(["init"])
    ws = Workspace.load(tmp_path / "ssvt.toml")
    assert ws.train_split == "train_aug"
    assert "gt" in ws.labels
    assert runner.invoke(app, ["init"]).exit_code == 1  # refuses to overwrite


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    out = ok(["demo", str(tmp_path / "demo"), "--quick"]).output
    for word in ("gt", "scribble", "seam", "random init", "kmeans.png"):
        assert word in out
    assert (tmp_path / "demo" / "kmeans" / "kmeans.png").exists()
    assert json.loads((tmp_path / "demo" / "runs" / "gt" / "metrics.json").read_text())["miou"] > 0.2


def test_file_system_errors_are_one_line(tmp_path, monkeypatch):
    import pipeline.cli.stage_one as stage_one

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "ssvt.toml"))

    monkeypatch.setattr(stage_one.Path, "write_text", full_disk)
    result = runner.invoke(app, ["init", str(tmp_path / "ssvt.toml")])
    assert result.exit_code == 1
    assert "No space left on device" in result.output
    assert "Traceback" not in result.output
