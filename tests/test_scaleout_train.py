"""Stage two under torchrun (CPU, gloo, two processes): an ablation grid dealt over ranks tables what
one process tables, data-parallel train-head equals single-process training on the same global batches,
only rank 0 writes, and a failing rank stops the other instead of hanging it."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cache.labels import ensure_labels
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.features.extract import store_path
from pipeline.training.ablate import Cell, deal_passes
from pipeline.training.data_parallel import BatchPlan, check_one_gpu_each
from pipeline.training.train import train_head, training_images
from pipeline.workspace import Workspace

# 16 training images in shards of 6: three shards (6, 6, 4), dealt unevenly over two ranks (10 and 6 images).
TINY = ExtractConfig(model="vit_tiny_test", random_init=True, size=56, workers=0, flip=True, images_per_shard=6)
TIMEOUT = 240  # seconds: a hang fails the test instead of blocking the suite
# One thread per process, in single-process runs too: float sums then add up in the same order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "SSVT_DIST_TIMEOUT": "120"}  # a hung rank gives up


@pytest.fixture(scope="module")
def ws(toy_with_empty_labels) -> Workspace:
    """The toy workspace extracted in shards of 6, plus a label source that labels nothing (its cells fail)."""
    return toy_with_empty_labels("scaleout", TINY)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun`` of 2 CPU processes on this machine running ``args`` (a program and its arguments)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--no-python", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def ssvt() -> str:
    return str(Path(sys.executable).parent / "ssvt")


def _train_args(ws: Workspace, labels: str, head: str, *extra: str, batch_size: int = 4) -> list[str]:
    return [ssvt(), "train-head", "--labels", labels, "--head", head, "--iterations", "7", "--warmup-iters", "2",
            "--batch-size", str(batch_size), "--lr", "0.02", "--device", "cpu", "--config", str(ws.file), *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("labels", "head", "pixels"),
    [("gt", "bn-linear", None), ("scribble", "conv", None), ("eps", "mlp", 30)],
)
def test_ddp_train_head_equals_one_process_on_the_same_global_batches(ws, tmp_path, labels, head, pixels):
    extra = ["--pixels-per-image", str(pixels)] if pixels else []
    before = set(ws.runs_dir.iterdir()) if ws.runs_dir.exists() else set()
    out = torchrun(_train_args(ws, labels, head, *extra), cwd=ws.file.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    made = set(ws.runs_dir.iterdir()) - before
    assert len(made) == 1, made  # rank 0 alone names and writes the run folder
    run = made.pop()
    assert "mIoU" in out.stdout
    assert out.stdout.count("train-head") == 1  # rank 0 alone prints
    config = json.loads((run / "config.json").read_text())
    assert config["result"]["processes"] == 2
    cfg = TrainConfig.from_dict(config["train"])

    store = FeatureStore.open(store_path(TINY, ws.layout, "train"))
    assert store.n_shards == 3
    labelset = ensure_labels(ws.label_source(labels), store, num_classes=21)
    plan = BatchPlan.for_store(store, training_images(store, labelset), cfg.batch_size, cfg.seed, world=2)
    assert [len(mine) for mine in plan.owned] != [8, 8]  # the shards divide unevenly
    alone = train_head(store, labelset, cfg, tmp_path / "alone", num_classes=21, plan=plan)

    history = json.loads((run / "history.json").read_text())
    assert history["step"] == alone.history["step"] == list(range(1, 8))
    assert history["epoch"] == alone.history["epoch"]
    assert history["lr"] == pytest.approx(alone.history["lr"], rel=1e-12)
    assert history["loss"] == pytest.approx(alone.history["loss"], rel=1e-5)
    ddp, ref = load_file(str(run / "head.safetensors")), load_file(str(tmp_path / "alone" / "head.safetensors"))
    assert ddp.keys() == ref.keys()
    for key in ddp:
        torch.testing.assert_close(ddp[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    # The plan is what makes them equal: one process on its own shuffled epochs trains another head.
    own = train_head(store, labelset, cfg, tmp_path / "own", num_classes=21)
    assert own.history["loss"][1:] != pytest.approx(history["loss"][1:], rel=1e-3)


def test_planned_training_reads_the_store_per_step_as_it_holds_it_in_memory(ws, tmp_path):
    """A share too big for memory is read image by image at each step (``memory="stream"`` forces it):
    the same batches, so the same head, bit for bit."""
    store = FeatureStore.open(store_path(TINY, ws.layout, "train"))
    labelset = ensure_labels(ws.label_source("gt"), store, num_classes=21)
    cfg = TrainConfig(labels="gt", head="bn-linear", iterations=5, batch_size=4, lr=0.02, device="cpu")
    plan = BatchPlan.for_store(store, training_images(store, labelset), cfg.batch_size, cfg.seed, world=2)
    runs = {memory: train_head(store, labelset, replace(cfg, memory=memory), tmp_path / memory, num_classes=21, plan=plan)
            for memory in ("ram", "stream")}  # fmt: skip
    assert (runs["ram"].in_memory, runs["stream"].in_memory) == (True, False)
    assert runs["ram"].history == runs["stream"].history
    held, streamed = (load_file(str(tmp_path / m / "head.safetensors")) for m in ("ram", "stream"))
    assert all(torch.equal(held[k], streamed[k]) for k in held)


def test_batch_plan_agrees_on_steps_and_covers_each_ranks_images(ws):
    store = FeatureStore.open(store_path(TINY, ws.layout, "train"))
    indices = np.arange(16)
    plan = BatchPlan.for_store(store, indices, batch_size=4, seed=3, world=2)
    assert [m.tolist() for m in plan.owned] == [[*range(6), *range(12, 16)], list(range(6, 12))]
    steps = list(plan.steps(10))
    assert len(steps) == 10
    assert all([len(p) for p in parts] == [2, 2] for parts in steps)
    for rank, mine in enumerate(plan.owned):  # each rank's first pass is a permutation of its images
        seen = np.concatenate([parts[rank] for parts in steps])
        assert sorted(seen[: len(mine)].tolist()) == sorted(mine.tolist())
    again = [np.concatenate(p) for p in BatchPlan.for_store(store, indices, 4, 3, 2).steps(10)]
    assert all((a == b).all() for a, b in zip(plan.global_batches(10), again, strict=True))
    assert (plan.epoch_of(4), plan.epoch_of(5)) == (1, 2)  # 16 images, 4 per step
    with pytest.raises(ConfigError, match="does not split evenly over 2 processes"):
        BatchPlan.for_store(store, indices, batch_size=5, seed=0, world=2)
    with pytest.raises(ConfigError, match="rank 3 of 4 would hold none"):
        BatchPlan.for_store(store, indices, batch_size=4, seed=0, world=4)


def test_a_rank_that_cannot_read_its_shards_stops_the_other(ws, tmp_path):
    """Rank 1 holds shard 1, whose file is broken: it fails reading, and rank 0 stops too (one line)
    instead of waiting for it at the first step; nothing is written."""
    broken = tmp_path / "train.zarr"
    shutil.copytree(store_path(TINY, ws.layout, "train"), broken)
    shard = broken / "tokens" / "c" / "1" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])
    args = _train_args(ws, "gt", "bn-linear", "--store", str(broken), "--out", str(tmp_path / "run"))
    out = torchrun(args, cwd=ws.file.parent)
    assert out.returncode != 0
    assert "error: reading the features failed on rank 1 of 2" in out.stderr
    assert not (tmp_path / "run" / "head.safetensors").exists()


def test_more_processes_than_gpus_is_refused_for_nccl(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_one_gpu_each(torch.device("cpu"))  # gloo on the CPU: any number of processes
    with pytest.raises(ConfigError, match=r"2 processes on this node share 1 GPU.*--nproc_per_node=1"):
        check_one_gpu_each(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_one_gpu_each(torch.device("cuda"))


def test_a_batch_that_does_not_split_over_the_ranks_is_one_line(ws, tmp_path):
    out = torchrun(_train_args(ws, "gt", "linear", "--out", str(tmp_path / "run"), batch_size=5), cwd=ws.file.parent)
    assert out.returncode != 0
    assert "error: --batch-size 5 does not split evenly over 2 processes; use a multiple of 2" in out.stderr
    assert not (tmp_path / "run").exists()


def _ablate_args(ws: Workspace, name: str) -> list[str]:
    return ["ablate", "--name", name, "--labels", "gt,scribble,empty", "--heads", "linear,bn-linear", "--seeds", "2",
            "--iterations", "5", "--batch-size", "4", "--lr", "0.02", "--device", "cpu", "--config", str(ws.file)]  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    """results.csv without the columns that name the grid's folder or time it."""
    with path.open() as f:
        return [{k: v for k, v in row.items() if k not in ("run", "train_seconds")} for row in csv.DictReader(f)]


def test_a_grid_over_two_ranks_tables_what_one_rank_tables(ws):
    one = subprocess.run([ssvt(), *_ablate_args(ws, "one")], env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([ssvt(), *_ablate_args(ws, "two")], cwd=ws.file.parent)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("mIoU %") == 1  # rank 0 alone prints the table
    assert "8 cells (8 trained now, 0 done before)" in two.stdout
    a, b = ws.layout.ablation_dir("one"), ws.layout.ablation_dir("two")
    assert (a / "table.md").read_text() == (b / "table.md").read_text()
    assert _rows(a / "results.csv") == _rows(b / "results.csv")  # every number, as written, bit for bit
    assert json.loads((a / "failed.json").read_text()) == json.loads((b / "failed.json").read_text())
    assert len(json.loads((b / "failed.json").read_text())) == 4  # the empty label set's cells, from both ranks
    cells = sorted(p.name for p in (b / "cells").iterdir())
    assert cells == sorted(p.name for p in (a / "cells").iterdir())
    assert len(cells) == 8
    for cell in cells:  # each cell trained on one rank, as in one process
        assert (a / "cells" / cell / "head.safetensors").read_bytes() == (b / "cells" / cell / "head.safetensors").read_bytes()


def test_a_rank_that_fails_in_a_grid_stops_the_other_and_its_cells_resume(ws, tmp_path):
    """Rank 1 crashes in its first pass (an injected bug, not a cell's own error): rank 0 finishes its
    cells, records them, and both exit with an error instead of waiting; a rerun trains what is missing."""
    script = tmp_path / "faulty_ssvt.py"
    script.write_text(
        textwrap.dedent("""
        import os
        import pipeline.training.ablate as ablate
        from pipeline.cli import app

        def crash(*args, **kwargs):
            raise RuntimeError("injected crash")

        if os.environ["RANK"] == "1":
            ablate.train_many_and_evaluate = crash
        app()
    """)
    )
    out = torchrun([sys.executable, str(script), *_ablate_args(ws, "faulty")], cwd=ws.file.parent)
    assert out.returncode != 0
    assert "error: training the cells failed on rank 1 of 2: injected crash" in out.stderr
    grid = ws.layout.ablation_dir("faulty")
    done = {p.parent.name for p in (grid / "cells").glob("*/metrics.json")}
    assert 0 < len(done) < 8  # rank 0's cells
    assert not (grid / "table.md").exists()
    rerun = torchrun([ssvt(), *_ablate_args(ws, "faulty")], cwd=ws.file.parent)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"8 cells ({8 - len(done)} trained now, {len(done)} done before)" in rerun.stdout


def test_passes_are_split_and_dealt_by_size():
    def pass_of(n: int, seed: int) -> list[Cell]:
        return [Cell(f"l{i}", "linear", "f", seed) for i in range(n)]

    shares = deal_passes([pass_of(4, 0), pass_of(1, 1), pass_of(1, 2), pass_of(2, 3)], world=2)
    assert [sum(len(unit) for unit in share) for share in shares] == [4, 4]
    one = deal_passes([pass_of(6, 0)], world=3)  # fewer passes than ranks: the pass is split
    assert sorted(len(unit) for share in one for unit in share) == [1, 2, 3]
    assert all(share for share in one)
    assert deal_passes([], world=2) == [[], []]
