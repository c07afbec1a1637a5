"""Benchmark: ``ssvt train-head`` in one process against the same head trained data-parallel by
``torchrun`` over two processes (gloo), on a small store of random-init features.

A toy workspace is extracted once (not timed). Then, interleaved, ``ssvt train-head`` runs with the
same global batch and steps in three set-ups: one process with torch's default threads (one per
core), one process with one thread, and two processes under torchrun with one thread each (torchrun's
``OMP_NUM_THREADS=1``). Each run reports two times: the training loop (``result.seconds`` in the run's
config.json: rank 0's steps) and the whole command (interpreter and process group start-up, reading
the features, writing the run folder, evaluation). Medians over ``--repeats``. On a small machine
this compares ways of using the same cores (threads or processes), not more hardware. Run by hand::

    .venv/bin/python scripts/bench_ddp.py                            # ~5 minutes on 2 cores
    .venv/bin/python scripts/bench_ddp.py --images 128 --iterations 200 --head conv --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import print_table

from pipeline.config import ExtractConfig
from pipeline.features.data import find_images
from pipeline.features.extract import extract, store_path
from pipeline.toy.dataset import make_toy
from pipeline.workspace import Workspace


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64, help="training images of the toy store")
    p.add_argument("--model", default="dinov2_vits14", help="backbone (random init) that writes the store")
    p.add_argument("--size", type=int, default=224, help="canvas size of the store")
    p.add_argument("--images-per-shard", type=int, default=16, help="shard size (shards are dealt over the ranks)")
    p.add_argument("--head", default="bn-linear")
    p.add_argument("--labels", default="gt")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (split over the processes)")
    p.add_argument("--repeats", type=int, default=2)
    return p.parse_args()


def ssvt() -> str:
    return str(Path(sys.executable).parent / "ssvt")


#: (label, processes, OMP_NUM_THREADS per process or None for torch's default).
SETUPS = (("1 process, default threads", 1, None), ("1 process, 1 thread", 1, 1), ("2 processes, 1 thread each", 2, 1))


def timed_run(processes: int, threads: int | None, args: argparse.Namespace, ws: Workspace, out: Path) -> tuple[float, float]:
    """(training loop seconds, whole command seconds) of one ``ssvt train-head``."""
    train = [ssvt(), "train-head", "--labels", args.labels, "--head", args.head, "--iterations", str(args.iterations),
             "--batch-size", str(args.batch_size), "--device", "cpu", "--config", str(ws.file), "--out", str(out)]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "--no-python"]
    cmd = train if processes == 1 else [*launcher, *train]
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(cmd, cwd=ws.file.parent, env=env, check=True, capture_output=True, text=True)
    whole = time.perf_counter() - began
    result = json.loads((out / "config.json").read_text())["result"]
    if result.get("processes", 1) != processes:
        raise RuntimeError(f"expected a run of {processes} processes, config.json says {result.get('processes')}")
    return float(result["seconds"]), whole


def main() -> None:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    try:
        toy = make_toy(root / "toy", n_train=args.images, n_val=4, seed=0)
        ws = Workspace.load(toy.root / "ssvt.toml")
        cfg = ExtractConfig(model=args.model, random_init=True, size=args.size, workers=0, flip=True,
                            images_per_shard=args.images_per_shard)  # fmt: skip
        for split in ("train", "val"):
            extract(find_images(ws.data_root, split), store_path(cfg, ws.layout, split), cfg)
        times: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in SETUPS}
        for r in range(args.repeats):
            for i, (label, processes, threads) in enumerate(SETUPS):
                times[label].append(timed_run(processes, threads, args, ws, root / f"run-{i}-{r}"))
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.model} (random) at {args.size}, "
              f"{args.images} images in shards of {args.images_per_shard}; {args.head} head, {args.labels} labels, "
              f"{args.iterations} steps of {args.batch_size} images; median of {args.repeats}")  # fmt: skip
        rows = []
        for label, runs in times.items():
            loop, whole = statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs)
            rows.append((label, f"{loop:.2f}", f"{1000 * loop / args.iterations:.1f}", f"{whole:.2f}"))
        print_table(("set-up", "train loop s", "ms/step", "whole command s"), rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
