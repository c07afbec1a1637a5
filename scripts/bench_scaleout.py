"""Benchmark: ``ssvt extract`` by one process against ``torchrun`` ranks on the same machine and images.

Each method runs the real command line in a subprocess and writes a fresh store of the same toy JPEGs
(resaved at VOC's 500 px) with a random-init backbone on the CPU:

- ``1 process``: ``python -m pipeline.cli extract``, torch's default thread count (all cores);
- ``1 process, 1 thread``: the same with ``OMP_NUM_THREADS=1``, what one rank of torchrun gets;
- ``torchrun xN``: ``torchrun --standalone --nproc_per_node=N -m pipeline.cli extract`` (one thread per
  rank, as torchrun sets it).

Two times are kept per run: the whole command (``wall``: Python and torch start-up, model build, store
creation, worker start-up, rendezvous) and the extraction loop of the slowest process (``loop``, the
summary's ``time``). Methods are interleaved (A, B, C, A, B, C, ...), medians are reported, with the
share of the machine's CPU that other processes used meanwhile. The stores of all methods are checked
to be byte-identical (``created`` aside). Run by hand::

    .venv/bin/python scripts/bench_scaleout.py                          # ~1.5 minutes on 2 cores
    .venv/bin/python scripts/bench_scaleout.py --images 96 --size 448 --nproc 2,4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_extract import upscale
from benchlib import cpu_seconds, print_table

from pipeline.toy.dataset import make_toy


def extract_args(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    return [
        "--model", args.model, "--random-init", "--size", str(args.size), "--device", "cpu", "--data", str(data),
        "--split", "train", "--out", str(out), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
        "--images-per-shard", str(args.images_per_shard),
    ]  # fmt: skip


def methods(args: argparse.Namespace) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (command before the extract flags, environment changes)."""
    cli = ["-m", "pipeline.cli", "extract"]
    one_thread = {"OMP_NUM_THREADS": "1"}
    out = {"1 process": ([sys.executable, *cli], {}), "1 process, 1 thread": ([sys.executable, *cli], one_thread)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for n in (int(x) for x in args.nproc.split(",")):
        out[f"torchrun x{n}"] = ([*torchrun, f"--nproc_per_node={n}", *cli], one_thread)
    return out


def run_once(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall s, loop s from the summary table, share of the machine's CPU that other processes used)."""
    busy0, own0 = cpu_seconds()
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env, "SSVT_PROGRESS_EVERY": "3600"})
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_seconds()
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    loop = re.search(r"time\s*│\s*([\d.]+) s", done.stdout)
    if loop is None:
        raise SystemExit(f"no summary table in the output of {' '.join(command)}:\n{done.stdout}")
    others = min(1.0, max(0.0, (busy1 - busy0 - (own1 - own0)) / (wall * (os.cpu_count() or 1))))
    return wall, float(loop[1]), others


def same_store(a: Path, b: Path) -> bool:
    """Every file of the two stores has the same bytes (the group zarr.json without ``created``)."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if files != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    for name in files:
        left, right = (a / name).read_bytes(), (b / name).read_bytes()
        if name == Path("zarr.json"):
            left, right = (json.dumps({**json.loads(x), "attributes": {**json.loads(x)["attributes"], "created": ""}}).encode()
                           for x in (left, right))  # fmt: skip
        if left != right:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dinov2_vits14", help="registry name (random init)")
    parser.add_argument("--size", type=int, default=224, help="canvas size")
    parser.add_argument("--images", type=int, default=48, help="toy images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images-per-shard", type=int, default=8, help="small, so every rank writes a few shards")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per process (the CLI default)")
    parser.add_argument("--nproc", default="2", help="comma list of torchrun process counts")
    parser.add_argument("--upscale", type=int, default=500, help="resave toy JPEGs at this longer side (VOC: 500); 0: keep")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (median reported)")
    parser.add_argument("--dir", default=None, help="folder for temporary files (default: system temp)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_scaleout_", dir=args.dir))
    print(
        f"torch {torch.__version__}, os.cpu_count() = {os.cpu_count()}, {platform.machine()}, "
        f"Python {platform.python_version()}, "
        f"model {args.model} (random init, CPU), {args.images} images at {args.size}, batch {args.batch_size}, "
        f"{args.images_per_shard} images per shard, {args.workers} DataLoader workers per process"
    )
    try:
        toy = make_toy(root / "toy", n_train=args.images, n_val=1)
        if args.upscale:
            from pipeline.features.data import find_images

            upscale(find_images(toy.voc_root, split="train"), args.upscale)
        runs = methods(args)
        times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
        for r in range(args.repeats):
            for i, (name, (command, env)) in enumerate(runs.items()):
                out = root / f"m{i}.zarr"
                shutil.rmtree(out, ignore_errors=True)
                times[name].append(run_once([*command, *extract_args(args, toy.voc_root, out)], env))
                wall, loop, others = times[name][-1]
                print(f"  round {r + 1} {name:<20} wall {wall:6.2f} s  loop {loop:6.2f} s  others' CPU {others:4.0%}", flush=True)
        identical = all(same_store(root / "m0.zarr", root / f"m{i}.zarr") for i in range(1, len(runs)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(t[1] for t in times["1 process"])
    rows = []
    for name, runs_ in times.items():
        wall, loop = statistics.median(t[0] for t in runs_), statistics.median(t[1] for t in runs_)
        rows.append((name, f"{wall:.2f}", f"{args.images / wall:.2f}", f"{loop:.2f}", f"{args.images / loop:.2f}",
                     f"{base / loop:.2f}", f"{statistics.median(t[2] for t in runs_):.0%}"))  # fmt: skip
    print(f"\nmedians of {args.repeats} interleaved rounds; speed-up = loop time of '1 process' / loop time")
    print_table(("method", "wall s", "wall img/s", "loop s", "loop img/s", "speed-up", "others' CPU"), rows)
    print(f"stores byte-identical across methods (created aside): {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
