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


def _tree(root: Path) -> set[Path]:
    """Every path under ``root``, to check that a failing command wrote nothing."""
    return set(root.rglob("*"))


def test_train_head_flags_become_config(toy_copy, monkeypatch):
    import pipeline.training.runs
    from pipeline.cache.label_kinds import LabelSource
    from pipeline.config import TrainConfig

    seen = {}

    def fake(*args, **kwargs):
        seen.setdefault("calls", []).append((args, kwargs))
        raise SystemExit(0)

    monkeypatch.setattr(pipeline.training.runs, "train_and_evaluate", fake)
    monkeypatch.chdir(toy_copy)
    result = runner.invoke(app, ["train-head", "--labels", "eps", "--head", "mlp", "--epochs", "3", "--min-steps", "7",
                                 "--batch-size", "5", "--lr", "0.02", "--weight-decay", "0.001", "--warmup", "0.1",
                                 "--warmup-iters", "2", "--poly-power", "0.9", "--schedule", "cosine",
                                 "--pixels-per-image", "123", "--no-flip", "--seed", "4",
                                 "--device", "cpu", "--strict", "--out", "somewhere", "--store", "X.zarr",
                                 "--val-store", "Y.zarr", "--features", "NAME"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(seen["calls"]) == 1
    (cfg, source, ws), kw = seen["calls"][0]
    assert cfg == TrainConfig(labels="eps", head="mlp", epochs=3, min_steps=7, batch_size=5, lr=0.02, weight_decay=0.001,
                              warmup=0.1, warmup_iters=2, poly_power=0.9, schedule="cosine", pixels_per_image=123, flip=False,
                              seed=4, device="cpu")  # fmt: skip
    root = toy_copy.resolve()
    assert ws.file == root / "ssvt.toml"
    assert source == LabelSource("eps", "mask", root / "labels" / "pseudo_eps")
    assert kw["gt"] == LabelSource("gt", "mask", root / "VOC2012" / "SegmentationClass")
    assert kw["store_path"] == "X.zarr"  # a store may be a URL: passed on as typed
    assert kw["val_store_path"] == "Y.zarr"
    assert kw["features"] == "NAME"
    assert kw["out"] == Path("somewhere")
    assert kw["strict"] is True
    assert callable(kw["progress"])
    assert kw["ranks"].world == 1  # no torchrun here: one process
    assert set(kw) == {"store_path", "val_store_path", "gt", "features", "out", "strict", "progress", "ranks"}


@pytest.mark.parametrize("command", ["train-head", "finetune"])
def test_a_url_as_run_folder_is_one_line(toy_copy, monkeypatch, command):
    """Run folders stay local; a URL is refused before anything is read, not turned into 's3:/b/r'."""
    pytest.importorskip("s3fs", reason="the s3 extra (pip install 'ssvt[s3]') parses URLs")
    monkeypatch.chdir(toy_copy)
    result = runner.invoke(app, [command, "--labels", "eps", "--out", "s3://bucket/runs/r"])
    assert result.exit_code == 1
    assert "--out (the run folder) must be a local folder" in result.output
    assert not (toy_copy / "s3:").exists()


@pytest.mark.parametrize(
    "args",
    [["evaluate", "R"], ["predict", "R", "--out", "O"], ["finetune", "--labels", "eps"], ["kmeans-viz"], ["demo"],
     ["pseudo-masks"], ["score-labels", "eps"], ["make-toy", "O"]],
)  # fmt: skip
def test_commands_that_do_not_share_work_refuse_torchrun(tmp_path, monkeypatch, args):
    """Under torchrun every rank would run the whole command and write the same files: one line instead."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert f"`ssvt {args[0]}` runs as one process, not under torchrun" in result.output
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_evaluate_flags_become_call(toy_copy, monkeypatch):
    import pipeline.inference.evaluate
    from pipeline.cache.label_kinds import LabelSource

    seen = {}

    def fake(*args, **kwargs):
        seen.setdefault("calls", []).append((args, kwargs))
        raise SystemExit(0)

    monkeypatch.setattr(pipeline.inference.evaluate, "evaluate_runs", fake)
    monkeypatch.chdir(toy_copy)
    result = runner.invoke(app, ["evaluate", "RUN", "RUN2", "--protocol", "ms", "--store", "S.zarr", "--gt", "gt", "--flip-tta",
                                 "--save-predictions", "P", "--device", "cpu", "--data", "D", "--weights", "W.pth",
                                 "--batch-size", "4", "--workers", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(seen["calls"]) == 1
    (runs, gt), kw = seen["calls"][0]
    assert runs == [Path("RUN"), Path("RUN2")]
    assert gt == LabelSource("gt", "mask", toy_copy.resolve() / "VOC2012" / "SegmentationClass")
    assert kw["protocol"] == "ms"
    assert kw["store_path"] == "S.zarr"
    assert kw["split"] == "val"
    assert kw["flip_tta"] is True
    assert kw["save_predictions"] == Path("P")
    assert (kw["device"], kw["data"], kw["weights"], kw["batch_size"], kw["workers"]) == ("cpu", Path("D"), "W.pth", 4, 1)
    assert kw["workspace"].file.resolve() == (toy_copy / "ssvt.toml").resolve()
    assert callable(kw["progress"])
    assert set(kw) == {"protocol", "workspace", "store_path", "data", "split", "weights", "flip_tta", "save_predictions",
                       "device", "batch_size", "workers", "progress"}  # fmt: skip


def test_predict_flags_become_call(toy_copy, monkeypatch, tmp_path):
    import pipeline.inference.predict

    seen = {}

    def fake(run, out, **kwargs):
        seen.update(run=run, out=out, **kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(pipeline.inference.predict, "predict", fake)
    monkeypatch.chdir(toy_copy)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"")
    result = runner.invoke(app, ["predict", "RUN", "--out", "O", "--data", str(photos), "--protocol", "ms",
                                 "--overlay", "--probs", "--device", "cpu", "--workers", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (seen["run"], seen["out"], seen["protocol"]) == (Path("RUN"), Path("O"), "ms")
    assert [i.id for i in seen["items"]] == ["a"]
    assert (seen["overlay"], seen["probs"], seen["device"], seen["workers"]) == (True, True, "cpu", 0)
    bad = runner.invoke(app, ["predict", "RUN", "--out", "O"])
    assert bad.exit_code == 1
    assert "--data PATH" in bad.output


def test_kmeans_viz_flags_become_config(toy_copy, monkeypatch):
    import pipeline.figures.shape_prior
    from pipeline.cache.label_kinds import LabelSource
    from pipeline.config import KMeansVizConfig

    seen = {}
    store = object()

    def fake_open(path, *args, **kwargs):
        seen.setdefault("opened", []).append((path, args, kwargs))
        return store

    def fake(*args, **kwargs):
        seen.setdefault("calls", []).append((args, kwargs))
        raise SystemExit(0)

    monkeypatch.setattr(FeatureStore, "open", staticmethod(fake_open))
    monkeypatch.setattr(pipeline.figures.shape_prior, "kmeans_viz", fake)
    monkeypatch.chdir(toy_copy)
    result = runner.invoke(app, ["kmeans-viz", "--store", "S.zarr", "--k", "3,5", "--ids", "a,b", "--seed", "2", "--joint",
                                 "--no-normalize", "--no-pca", "--gt", "gt", "--out", "OUT"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["opened"] == [("S.zarr", (), {})]
    assert len(seen["calls"]) == 1
    (opened, out, cfg), kw = seen["calls"][0]
    assert opened is store
    assert out == Path("OUT")
    assert cfg == KMeansVizConfig(ks=(3, 5), ids=("a", "b"), n=4, seed=2, joint=True, normalize=False, pca=False,
                                  num_classes=21)  # fmt: skip
    assert kw["gt"] == LabelSource("gt", "mask", toy_copy.resolve() / "VOC2012" / "SegmentationClass")
    assert set(kw) == {"gt", "progress"}


def test_unknown_head_or_labels_fail_before_any_work(toy_copy, monkeypatch):
    monkeypatch.chdir(toy_copy)
    assert not (toy_copy / "runs").exists()
    assert not (toy_copy / "cache").exists()
    before = _tree(toy_copy)

    result = runner.invoke(app, ["train-head", "--labels", "eps", "--head", "segformer"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "segformer" in lines[0]
    for name in ("linear", "bn-linear", "mlp", "conv"):
        assert name in lines[0]
    assert "Traceback" not in result.output
    assert not (toy_copy / "runs").exists()
    assert _tree(toy_copy) == before

    result = runner.invoke(app, ["train-head", "--labels", "nosuch"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "nosuch" in result.output
    assert "Traceback" not in result.output
    assert _tree(toy_copy) == before

    result = runner.invoke(app, ["train-head", "--labels", "cls"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "image-level" in result.output  # the label kind is refused before a store is looked for ...
    assert "no cached features" not in result.output  # ... (the toy copy has no cache)
    assert "Traceback" not in result.output
    assert _tree(toy_copy) == before


def test_unknown_workspace_key_is_an_error(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (toy.root / "ssvt.toml").read_text()
    assert "[dataset]\n" in text
    typo = tmp_path / "typo.toml"
    typo.write_text(text.replace("[dataset]\n", "[dataset]\nnum_class = 150\n", 1))
    result = runner.invoke(app, ["train-head", "--labels", "gt", "--config", str(typo)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "`num_class`" in result.output
    assert "did you mean `num_classes`" in result.output
    assert "valid keys: root, format, splits, train_split, val_split, num_classes" in result.output

    section = tmp_path / "section.toml"
    section.write_text(text + "\n[trainig]\nepochs = 3\n")
    result = runner.invoke(app, ["train-head", "--labels", "gt", "--config", str(section)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "`trainig`" in result.output
    assert "dataset, paths, labels" in result.output


def test_errors_are_one_red_line(toy_copy, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["extract", "--size", "450"])
    assert result.exit_code == 1
    assert "size must be a multiple of the patch size 14 of dinov2_vitl14, got 450 (try 448)" in result.output
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
    out = ok(["train-head", "--labels", "eps", "--epochs", "30", "--min-steps", "20", "--lr", "0.01"]).output
    assert "mIoU" in out
    assert "aeroplane" in out
    metrics = json.loads(Path("runs/eps-bn-linear/metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1
    out = ok(["evaluate", "runs/eps-bn-linear", "--flip-tta", "--save-predictions", "pred"]).output
    assert "flip TTA" in out
    assert len(list(Path("pred").glob("*.png"))) == 4
    assert Path("runs/eps-bn-linear/worst.png").exists()
    out = ok(["evaluate", "runs/eps-bn-linear", "--protocol", "lin", "--workers", "0"]).output
    assert "metrics.lin.json" in out
    assert json.loads(Path("runs/eps-bn-linear/metrics.lin.json").read_text())["settings"]["stride"] == 341
    ok(["predict", "runs/eps-bn-linear", "--split", "val", "--out", "preds", "--overlay", "--workers", "0"])
    assert len(list(Path("preds").glob("*.png"))) == 4
    assert len(list(Path("preds/overlay").glob("*.png"))) == 4
    out = ok(["info", str(store)]).output
    assert "vit_tiny_test" in out
    assert "eps" in out
    assert "yes" in out
    ok(["kmeans-viz", "--k", "2,3", "--n", "2", "--out", "km"])
    assert Path("km/kmeans.png").exists()
    assert Path("km/kmeans.pdf").exists()
    # image-level labels -> pseudo-masks -> a head trained on them
    out = ok(["pseudo-masks", "--labels", "cls", "--min-steps", "10", "--figure", "1", "--out", "pm"]).output
    assert "mIoU vs ground truth" in out
    assert Path("pm/cam.png").exists()
    assert Path("cache/vit_tiny_test-56-last-random/train.labels.cam.h5").exists()
    assert "mIoU" in ok(["train-head", "--labels", "cam", "--epochs", "30", "--min-steps", "5"]).output
    assert json.loads(Path("runs/cam-bn-linear/config.json").read_text())["labels"]["name"] == "cam"
    # Rerunning extract resumes (nothing to do); other settings are refused with the differences named.
    assert "0 / 1" in ok(["extract", *TINY, "--flip", "--split", "val"]).output  # 0 written, 1 already done
    bad = runner.invoke(app, ["extract", *TINY, "--split", "val", "--out", "cache/vit_tiny_test-56-last-random/val.zarr"])
    assert bad.exit_code == 1
    assert "views" in bad.output
    assert "--overwrite" in bad.output


def test_init_writes_a_loadable_workspace(tmp_path, monkeypatch):
    from pipeline.workspace import Workspace

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


def test_brackets_print_literally(tmp_path, monkeypatch):
    """Rich reads [word] as markup and drops it; help texts, messages and tables keep their brackets."""
    import typer.main
    from rich.console import Console
    from rich.text import Text

    from pipeline.cli._common import kv_table

    monkeypatch.chdir(tmp_path)
    assert "set [dataset] root" in ok(["init"]).output
    assert "[dataset]" in ok(["extract", "--help"]).output
    assert "[labels.*]" in ok(["train-head", "--help"]).output
    result = runner.invoke(app, ["info", "data[abc]/x.zarr"])
    assert result.exit_code == 1
    assert "data[abc]/x.zarr" in result.output
    wide = Console(width=200, record=True)
    wide.print(kv_table("runs[abc]", [("store", Path("data[abc]/x.zarr")), ("[key]", "data[1]/y")]))
    table = wide.export_text()
    assert all(s in table for s in ("runs[abc]", "data[abc]/x.zarr", "[key]", "data[1]/y")), table

    def helps(command):  # every help text typer renders as rich markup, in every command
        yield command.help or ""
        yield from (getattr(p, "help", None) or "" for p in command.params)
        for sub in getattr(command, "commands", {}).values():
            yield from helps(sub)

    for text in helps(typer.main.get_command(app)):
        assert Text.from_markup(text).plain == text.replace("\\[", "["), text


def test_version():
    from pipeline import __version__

    assert ok(["--version"]).output.strip() == f"ssvt {__version__}"


def test_a_command_failing_early_prints_only_its_error(toy_copy, monkeypatch):
    monkeypatch.chdir(toy_copy)
    (toy_copy / "notarun").mkdir()
    for args in (["evaluate", "notarun"], ["predict", "notarun", "--out", "o", "--data", "VOC2012/JPEGImages"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert result.output.startswith("error: notarun"), result.output  # no bar, not even an empty line
        assert len(result.output.strip().splitlines()) == 1, result.output
    monkeypatch.setenv("SSVT_PROGRESS_EVERY", "soon")
    result = runner.invoke(app, ["evaluate", "notarun"])
    assert result.exit_code == 1
    assert "SSVT_PROGRESS_EVERY" in result.output


def test_progress_lines_when_stdout_is_not_a_terminal(toy_copy, monkeypatch):
    monkeypatch.chdir(toy_copy)
    monkeypatch.setenv("SSVT_PROGRESS_EVERY", "0")  # a line at every update (default: every 30 s)
    out = ok(["extract", *TINY, "--split", "val", "--batch-size", "2", "--images-per-shard", "2"]).output
    lines = [line for line in out.splitlines() if line.startswith("extract val: ")]
    assert "extract val: 2/8 images (" in out
    assert len(lines) >= 4, out
    assert "img/s" in lines[-1]
    assert lines[-1].startswith("extract val: 8/8 images (")
    assert "done in" in lines[-1]
    assert "━" not in out  # lines instead of bars in a log
