"""Extraction shared by processes: ranks of a ``torchrun`` group (CPU, gloo) and parts of a job array.

The stores they write are compared byte for byte with one written by a single process. torchrun gives
each worker one thread (OMP_NUM_THREADS=1), so the reference is written with one thread too. On the
two-core machine these tests were written on, one and two threads give the same bytes (this model,
and ViT-S/14 at 224 px; MKL splits a matrix product between threads by output blocks, so each sum
keeps its order), but BLAS libraries do not promise that for every shape and thread count. Every
subprocess has a timeout, so a hang fails the test instead of blocking CI.
"""

import contextlib
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
import torch
from typer.testing import CliRunner

from pipeline.cache.store import FeatureStore
from pipeline.cli import app
from pipeline.config import ExtractConfig
from pipeline.distributed import Ranks
from pipeline.errors import ConfigError, StoreMismatchError
from pipeline.features.data import find_images
from pipeline.features.extract import ExtractSummary, RunProgress, extract, load_backbone, open_or_create

TINY = {"model": "vit_tiny_test", "random_init": True, "size": 56, "workers": 0, "batch_size": 2, "device": "cpu"}
CLI = ["--model", "vit_tiny_test", "--random-init", "--size", "56", "--workers", "0", "--batch-size", "2", "--device", "cpu"]
TIMEOUT = 180  # seconds for one torchrun; a run takes 5-15 s on two busy cores
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]  # the torchrun of this Python

#: torchrun's worker that writes each shard slowly and leaves its pid in a file: the test kills it part-way.
SLOW_WORKER = """
import os, sys, time
from pipeline.cache.store import FeatureStore
write = FeatureStore.write_shard
def slow_write(self, *args):
    write(self, *args)
    time.sleep(0.5)
FeatureStore.write_shard = slow_write
with open(os.path.join(sys.argv[1], "rank%s.pid" % os.environ["RANK"]), "w") as f:
    f.write(str(os.getpid()))
from pipeline.cli import app
app(sys.argv[2:], prog_name="ssvt")
"""


def cli_args(toy, split: str, out: Path, images_per_shard: int) -> list[str]:
    return [*CLI, "--data", str(toy.voc_root), "--split", split, "--out", str(out), "--images-per-shard", str(images_per_shard)]


def start(command: list[str]) -> subprocess.Popen[str]:
    """``command`` in a session of its own (torchrun and its workers: :func:`stop` ends them all), with
    one thread per process, a progress line at every update and collectives that give up after 2 minutes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSVT_PROGRESS_EVERY": "0", "SSVT_DIST_TIMEOUT": "120"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop(proc: subprocess.Popen[str]) -> None:
    """Kill what is left of ``proc``'s session (a hung run's workers), if anything."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def torchrun(n: int, args: list[str], *, cli: tuple[str, ...] = ("extract",)) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=n -m pipeline.cli extract ARGS`` (``cli``: what comes before
    ARGS); a run that takes longer than TIMEOUT is killed with its workers and fails the test."""
    command = [*TORCHRUN, f"--nproc_per_node={n}", "-m", "pipeline.cli", *cli, *args]
    proc = start(command)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        stop(proc)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def single_process_store(toy, split: str, out: Path, images_per_shard: int) -> Path:
    """The reference: the store one process with one thread writes (see the module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(find_images(toy.voc_root, split), out, ExtractConfig(**TINY, images_per_shard=images_per_shard))
    finally:
        torch.set_num_threads(threads)
    return out


def table_value(output: str, key: str) -> str:
    """The value of row ``key`` of a summary table as rich prints it (``│ key │ value │``)."""
    match = re.search(rf"{re.escape(key)}\s*│\s*(.*?)\s*│", output)
    assert match, output
    return match[1]


def assert_same_bytes(a: Path, b: Path) -> None:
    """Every file of store ``a`` has the bytes of the same file in ``b``; the group zarr.json is
    compared without ``created``, the one attribute two stores from the same inputs differ in."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files:
        left, right = (a / name).read_bytes(), (b / name).read_bytes()
        if name == Path("zarr.json"):
            left, right = (json.loads(x) for x in (left, right))
            assert left["attributes"].pop("created")
            assert right["attributes"].pop("created")
        assert left == right, f"{name} differs"


@pytest.mark.parametrize(
    ("split", "images_per_shard"),
    [("train", 2), ("train", 6), ("val", 8)],
    ids=["8-shards", "3-shards-uneven", "1-shard-fewer-than-ranks"],
)
def test_two_ranks_write_the_store_one_process_writes(toy, tmp_path, split, images_per_shard):
    out = tmp_path / "ranks.zarr"
    result = torchrun(2, cli_args(toy, split, out, images_per_shard))
    assert result.returncode == 0, result.stderr
    assert_same_bytes(out, single_process_store(toy, split, tmp_path / "one.zarr", images_per_shard))
    n = len(find_images(toy.voc_root, split))
    assert len(re.findall(rf"^extract {split}\s*$", result.stdout, re.MULTILINE)) == 1  # one table: rank 1 prints nothing
    assert f"extract {split} (2 processes): {n}/{n} images" in result.stdout  # progress summed over ranks
    assert table_value(result.stdout, "shards written / already done") == f"{-(-n // images_per_shard)} / 0"  # all ranks'
    assert table_value(result.stdout, "processes") == "2"
    assert "error" not in result.stderr.lower()


def test_killed_rank_leaves_only_unfinished_shards_and_one_process_finishes(toy, tmp_path):
    script, out = tmp_path / "slow_worker.py", tmp_path / "killed.zarr"
    script.write_text(SLOW_WORKER)
    command = [*TORCHRUN, "--nproc_per_node=2", str(script), str(tmp_path),
               "extract", *cli_args(toy, "train", out, 2)]  # fmt: skip
    proc = start(command)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            pid = tmp_path / "rank1.pid"
            if pid.exists() and FeatureStore.exists(out) and FeatureStore.open(out).done_shards().sum() >= 1:
                os.kill(int(pid.read_text()), signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.communicate(timeout=TIMEOUT)  # torchrun stops rank 0 too and fails
    finally:
        stop(proc)
    assert proc.returncode != 0
    done = FeatureStore.open(out).done_shards()
    assert 1 <= done.sum() < 8, "the run was not killed part-way"

    summary = extract(find_images(toy.voc_root, "train"), out, ExtractConfig(**TINY, images_per_shard=2))
    assert (summary.shards_written, summary.shards_skipped) == (8 - done.sum(), done.sum())  # only the missing ones
    assert summary.images_done == 2 * (8 - done.sum())
    assert_same_bytes(out, single_process_store(toy, "train", tmp_path / "one.zarr", 2))


def test_a_run_of_four_is_finished_by_two_sharing_what_is_left(toy, tmp_path):
    """Four ranks, one of them killed once a shard is flagged: torchrun stops the run; two ranks then
    deal what is missing between them and finish the store, byte for byte one process's."""
    script, out = tmp_path / "slow_worker.py", tmp_path / "four.zarr"
    script.write_text(SLOW_WORKER)
    proc = start([*TORCHRUN, "--nproc_per_node=4", str(script), str(tmp_path), "extract", *cli_args(toy, "train", out, 2)])
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            pid = tmp_path / "rank3.pid"
            if pid.exists() and FeatureStore.exists(out) and FeatureStore.open(out).done_shards().sum() >= 1:
                os.kill(int(pid.read_text()), signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.communicate(timeout=TIMEOUT)
    finally:
        stop(proc)
    assert proc.returncode != 0
    done = int(FeatureStore.open(out).done_shards().sum())
    assert 1 <= done < 8, "the run of four was not killed part-way"

    result = torchrun(2, cli_args(toy, "train", out, 2), cli=("--verbose", "extract"))
    assert result.returncode == 0, result.stderr
    assert table_value(result.stdout, "shards written / already done") == f"{8 - done} / {done}"
    missing = 8 - done
    for rank in (0, 1):  # rank 0's list of the missing shards, dealt round-robin
        assert f"rank {rank}/2: {missing} of 8 shards missing, {(missing + 1 - rank) // 2} of them here" in result.stderr
    assert_same_bytes(out, single_process_store(toy, "train", tmp_path / "one.zarr", 2))


def test_error_on_rank_0_stops_the_other_ranks_with_one_line(toy, tmp_path):
    out = tmp_path / "other.zarr"
    extract(find_images(toy.voc_root, "val")[:2], out, ExtractConfig(**TINY, images_per_shard=2))  # other images
    result = torchrun(2, cli_args(toy, "val", out, 2))
    assert result.returncode != 0
    # One line per rank: rank 1's names rank 0's failure. (torchrun may stop rank 0 before it prints,
    # once rank 1 has exited, so rank 0's own line is not required.)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert 1 <= len(errors) <= 2, result.stderr
    assert all("was made with other settings (images: store has 2 ids, this run has 8" in line for line in errors)
    assert any(line.startswith(f"error: preparing {out} failed on rank 0 of 2: {out} was made") for line in errors)


def test_a_rank_failing_mid_run_stops_every_rank_and_the_finished_shards_stay(toy_copy, tmp_path):
    bad = Path(find_images(toy_copy / "VOC2012", "val")[2].path)  # in shard 1, which rank 1 gets
    bad.write_bytes(bad.read_bytes()[:200])
    out = tmp_path / "s.zarr"
    result = torchrun(2, [*CLI, "--data", str(toy_copy / "VOC2012"), "--split", "val", "--out", str(out),
                          "--images-per-shard", "2", "--strict"])  # fmt: skip
    assert result.returncode != 0
    assert f"error: extracting {out} failed on rank 1 of 2: cannot read image {bad}" in result.stderr
    assert FeatureStore.open(out).done_shards().tolist() == [True, False, True, False]  # rank 0's shards 0 and 2


def test_parts_started_together_equal_one_run(toy, tmp_path):
    out = tmp_path / "parts.zarr"
    command = [sys.executable, "-m", "pipeline.cli", "extract", *cli_args(toy, "train", out, 2)]
    procs = [start([*command, "--part", f"{i}/2"]) for i in (1, 2)]  # both race to create the store
    try:
        outputs = [proc.communicate(timeout=TIMEOUT)[0] for proc in procs]
    finally:
        for proc in procs:
            stop(proc)
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    for i, output in enumerate(outputs, start=1):
        assert f"extract train (part {i}/2): 8/8 images" in output  # each part reports its own share
        assert table_value(output, "shards written / already done").startswith("4 / ")
    assert_same_bytes(out, single_process_store(toy, "train", tmp_path / "one.zarr", 2))


def test_part_then_a_plain_run_finishes_the_store(toy, tmp_path):
    items, out, cfg = find_images(toy.voc_root, "train"), tmp_path / "s.zarr", ExtractConfig(**TINY, images_per_shard=2)
    part = extract(items, out, cfg, ranks=Ranks.from_part("2/2"))
    assert (part.shards_written, part.shards_missing) == (4, 4)
    assert FeatureStore.open(out).done_shards().tolist() == [False, True] * 4  # the odd shards: k % 2 == 1
    again = extract(items, out, cfg, ranks=Ranks.from_part("2/2"))
    assert (again.shards_written, again.shards_skipped) == (0, 4)
    rest = extract(items, out, cfg)
    assert (rest.shards_written, rest.shards_skipped, rest.shards_missing) == (4, 4, 0)
    assert_same_bytes(out, single_process_store(toy, "train", tmp_path / "one.zarr", 2))


def test_part_option_reports_what_is_left_and_is_refused_under_torchrun(toy, tmp_path, monkeypatch):
    runner, out = CliRunner(), tmp_path / "s.zarr"
    result = runner.invoke(app, ["extract", *cli_args(toy, "val", out, 2), "--part", "1/2"])
    assert result.exit_code == 0, result.output
    assert table_value(result.output, "shards still missing").startswith("2 (the other parts write them")
    assert table_value(result.output, "shards written / already done") == "2 / 0"
    assert "--part" in runner.invoke(app, ["extract", "--help"]).output
    bad = runner.invoke(app, ["extract", *cli_args(toy, "val", out, 2), "--part", "3/2"])
    assert bad.exit_code == 1
    assert "--part takes i/n with 1 <= i <= n" in bad.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused = runner.invoke(app, ["extract", *cli_args(toy, "val", out, 2), "--part", "1/2"])
    assert refused.exit_code == 1
    assert refused.output.count("\n") == 1
    assert "under torchrun the ranks already share the work: drop --part" in refused.output


def test_overwrite_is_refused_for_a_part(toy, tmp_path):
    with pytest.raises(ConfigError, match="--overwrite with --part 1/2 could delete what the other parts wrote"):
        extract(find_images(toy.voc_root, "val"), tmp_path / "s.zarr", ExtractConfig(**TINY), overwrite=True,
                ranks=Ranks.from_part("1/2"))  # fmt: skip
    assert not (tmp_path / "s.zarr").exists()


def test_a_part_that_loses_the_race_to_create_resumes_the_winners_store(toy, tmp_path, monkeypatch):
    items, out, cfg = find_images(toy.voc_root, "val"), tmp_path / "s.zarr", ExtractConfig(**TINY, images_per_shard=2)
    backbone, create = load_backbone(cfg), FeatureStore.create

    def another_part_first(per_shard: int):
        def create_too_late(path, **kw):
            create(path, **{**kw, "images_per_shard": per_shard})  # the other part's store lands first,
            return create(path, **kw)  # so ours finds the path taken

        return create_too_late

    monkeypatch.setattr(FeatureStore, "create", another_part_first(2))
    store = open_or_create(out, items, cfg, backbone, overwrite=False)
    assert (store.mode, store.n_images, store.missing_shards()) == ("r+", 8, [0, 1, 2, 3])
    FeatureStore.remove(out)
    monkeypatch.setattr(FeatureStore, "create", another_part_first(4))
    with pytest.raises(StoreMismatchError, match="images_per_shard: store has 4, this run has 2"):
        open_or_create(out, items, cfg, backbone, overwrite=False)


def test_rank_0_progress_adds_the_shards_other_ranks_flag_done(toy, tmp_path):
    items, out, cfg = find_images(toy.voc_root, "val"), tmp_path / "s.zarr", ExtractConfig(**TINY, images_per_shard=2)
    store = open_or_create(out, items, cfg, load_backbone(cfg), overwrite=False)
    seen: list[tuple[int, int]] = []
    summary = ExtractSummary(out, 8, "cpu", "random init")
    tally = RunProgress(store, [0, 1, 2, 3], [0, 2], summary, lambda done, total: seen.append((done, total)), poll=True)
    summary.images_done = 1  # rank 0 is part-way through its first shard
    n, v, c = 2, store.n_views, store.channels
    zeros = np.zeros((n, v, *store.grid, c), np.float16), np.zeros((n, v, c), np.float16), np.zeros((n, 6), np.int32)
    FeatureStore.open(out, mode="r+").write_shard(1, *zeros, np.ones(n, np.uint8))  # rank 1 finishes shard 1
    deadline = time.monotonic() + 30
    while (3, 8) not in seen and time.monotonic() < deadline:
        time.sleep(0.1)
    tally.stop()
    assert seen[0] == (0, 8)
    assert (3, 8) in seen  # one image of rank 0's shard + the two of rank 1's
    assert seen == sorted(seen)
