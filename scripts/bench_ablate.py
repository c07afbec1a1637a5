"""Benchmark: one ``ssvt ablate`` grid against the same cells run one by one with ``ssvt train-head``.

The issue's question: on toy data with a small model, a grid of 4 label sets x 2 heads x 3 seeds, end
to end, against the sum of the same 24 cells run separately. Goal: the grid takes <= 0.5 of the sum.

1. ``make_toy`` writes ``--train`` + ``--val`` images; ``ssvt extract --model M --random-init --size S
   --workers 0`` caches both splits once (timed, reported separately, part of neither side);
2. side A: ``ssvt ablate --labels L1,L2,.. --heads H1,H2 --seeds N --epochs E ...`` as one subprocess
   (the real CLI; wall clock, tables and figure included);
3. side B: the same cells as ``ssvt train-head --labels L --head H --seed S --epochs E ... --out
   runs/...`` subprocesses, one per cell, their wall clocks summed.

Both sides use the same training settings (``--epochs``, ``--min-steps``, ``--lr``, ``--batch-size``,
``--pixels-per-image``, ``--device cpu``; by default the demo's fast ones with fewer steps: lr 1e-2,
at least 40 steps of 16 images, dense labels on 1,024 random pixels per image, since the
full-resolution loss costs about 0.6 s a step on a 2-core CPU) and evaluate every cell on the val
split against ``gt``. Both start from the same state: the imported label sets of the stores are
deleted before each side, so each pays the label import once per label set (A: before its passes;
B: in the first train-head run of each label set).
With ``--preimport`` they are imported before both sides instead, and neither pays it.

It prints: side, cells, wall s, per cell s, the subprocesses' CPU seconds, the sum of the cells'
training loops (config.json "result" -> "seconds", which a fused pass splits evenly among its heads)
and the share of the CPU that other processes used meanwhile; the ratio A / B and whether it is <= 0.5;
how many heads each ablate pass trained ("heads_in_pass"); and whether matching cells agree: the max
abs difference of mIoU and the number of bit-identical head files (same settings and seed give the
same head). One run, no repeats: on a shared machine read it with the "others' CPU" column. Results:
BENCHMARKS.md, section "Ablation grid". Run by hand::

    .venv/bin/python scripts/bench_ablate.py    # 13 minutes on 2 AMD EPYC cores that others used 2/3 of
    .venv/bin/python scripts/bench_ablate.py --train 16 --val 8 --min-steps 20 --keep   # quick look
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchlib import cpu_seconds, print_table

from pipeline.cache.names import AblationFiles, RunFiles, label_set_paths
from pipeline.toy.dataset import make_toy
from pipeline.workspace import Workspace


@dataclass
class Side:
    """One side's timing: wall seconds per subprocess and the share of CPU others used meanwhile."""

    walls: list[float]
    cpu: float  # CPU seconds of the subprocesses (user + system)
    others: float


def ssvt_command() -> list[str]:
    """The installed ``ssvt`` entry point next to this interpreter (else the same app through ``-c``)."""
    script = Path(sys.executable).parent / "ssvt"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from pipeline.cli import app; app()"]


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run ``cmd`` to the end (output to ``log``); its wall seconds. Raises when it fails."""
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
    return wall


def children_cpu() -> float:
    """User + system CPU seconds of this process's reaped children so far."""
    t = os.times()
    return t.children_user + t.children_system


def others_share(busy0: float, own0: float, wall: float) -> float:
    """Share of the machine's CPU that other processes used since (busy0, own0) (children included in own)."""
    busy1, own1 = cpu_seconds()
    return min(1.0, max(0.0, (busy1 - busy0 - (own1 - own0)) / (wall * (os.cpu_count() or 1))))


def forget_labels(ws: Workspace, stores: list[Path]) -> int:
    """Delete every label set imported for ``stores``; how many were deleted."""
    paths = [p for store in stores for p in label_set_paths(store).values()]
    for path in paths:
        path.unlink()
    return len(paths)


def shown(cmd: list[str], ssvt: list[str], ws: Workspace) -> str:
    """``cmd`` as typed in the workspace folder: ``ssvt ...`` with paths relative to it."""
    return "ssvt " + " ".join(cmd[len(ssvt) :]).replace(str(ws.file.parent) + "/", "")


def cell_config(run: Path) -> dict:
    return json.loads(RunFiles(run).config.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dinov2_vits14", help="registry name (random init)")
    parser.add_argument("--size", type=int, default=224, help="canvas side of the extraction")
    parser.add_argument("--train", type=int, default=32, help="toy training images")
    parser.add_argument("--val", type=int, default=8, help="toy validation images")
    parser.add_argument("--labels", default="gt,eps,seam,scribble", help="label sets of the grid")
    parser.add_argument("--heads", default="linear,bn-linear", help="heads of the grid")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (labels, head)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per cell (both sides)")
    parser.add_argument("--min-steps", type=int, default=40, help="at least this many steps per cell (both sides)")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate (both sides)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (both sides)")
    parser.add_argument(
        "--pixels-per-image",
        type=int,
        default=1024,
        help="dense labels: loss on this many pixels per image, as the demo (0: all pixels)",
    )
    parser.add_argument("--preimport", action="store_true", help="import the label sets before both sides (else: each pays it)")
    parser.add_argument("--workdir", default=None, help="folder for the toy workspace (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace, its runs and logs")
    args = parser.parse_args()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_ablate_"))
    print(
        f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, {args.model} (random init) at "
        f"{args.size}, files under {root}",
        flush=True,
    )
    try:
        run(root, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args: argparse.Namespace) -> None:
    ssvt = ssvt_command()
    logs = root / "logs"
    t0 = time.perf_counter()
    toy = make_toy(root / "toy", n_train=args.train, n_val=args.val, seed=0)
    ws = Workspace.load(toy.workspace)
    logs.mkdir(parents=True, exist_ok=True)
    print(f"toy data: {args.train} train + {args.val} val images in {time.perf_counter() - t0:.1f} s", flush=True)
    extract = [*ssvt, "extract", "--model", args.model, "--random-init", "--size", str(args.size), "--workers", "0",
               "--device", "cpu", "--config", str(ws.file)]  # fmt: skip
    seconds = timed(extract, ws.file.parent, logs / "extract.log")
    stores = [ws.layout.find_store(split, None) for split in (ws.train_split, ws.val_split) if split]
    print(f"extract (train and val, one process): {seconds:.1f} s; stores {', '.join(str(s) for s in stores)}", flush=True)

    labels, heads = args.labels.split(","), args.heads.split(",")
    train = ["--epochs", str(args.epochs), "--min-steps", str(args.min_steps), "--lr", str(args.lr),
             "--batch-size", str(args.batch_size), "--device", "cpu"]  # fmt: skip
    if args.pixels_per_image:
        train += ["--pixels-per-image", str(args.pixels_per_image)]
    cells = [(lab, head, seed) for lab in labels for head in heads for seed in range(args.seeds)]
    if args.preimport:
        from pipeline.cache.labels import ensure_labels
        from pipeline.cache.store import FeatureStore

        train_store = FeatureStore.open(stores[0])
        for lab in labels:
            ensure_labels(ws.labels[lab], train_store, num_classes=ws.num_classes)

    # side A: the grid in one command
    if not args.preimport:
        print(f"side A: deleted {forget_labels(ws, stores)} imported label sets", flush=True)
    ablate = [*ssvt, "ablate", "--name", "bench", "--labels", ",".join(labels), "--heads", ",".join(heads),
              "--seeds", str(args.seeds), *train, "--config", str(ws.file)]  # fmt: skip
    print("side A: " + shown(ablate, ssvt, ws), flush=True)
    busy0, own0, cpu0 = *cpu_seconds(), children_cpu()
    wall = timed(ablate, ws.file.parent, logs / "ablate.log")
    side_a = Side([wall], children_cpu() - cpu0, others_share(busy0, own0, wall))
    print(f"  {wall:.1f} s", flush=True)
    files = AblationFiles(ws.layout.ablation_dir("bench"))
    grid = {(row["labels"], row["head"], int(row["seed"])): Path(row["run"]) for row in
            json.loads(files.results_json.read_text())}  # fmt: skip
    if sorted(grid) != sorted(cells):
        raise RuntimeError(f"the grid finished {len(grid)} of {len(cells)} cells; see {logs / 'ablate.log'}")

    # side B: the same cells one by one
    if not args.preimport:
        print(f"side B: deleted {forget_labels(ws, stores)} imported label sets", flush=True)
    runs = root / "toy" / "runs" / "bench"
    walls: list[float] = []
    busy0, own0, cpu0 = *cpu_seconds(), children_cpu()
    for lab, head, seed in cells:
        out = runs / f"{lab}-{head}-seed{seed}"
        cmd = [*ssvt, "train-head", "--labels", lab, "--head", head, "--seed", str(seed), *train, "--out", str(out),
               "--config", str(ws.file)]  # fmt: skip
        if not walls:
            print("side B, first cell: " + shown(cmd, ssvt, ws), flush=True)
        walls.append(timed(cmd, ws.file.parent, logs / f"train-head-{out.name}.log"))
        print(f"  {out.name:<28} {walls[-1]:6.1f} s", flush=True)
    side_b = Side(walls, children_cpu() - cpu0, others_share(busy0, own0, sum(walls)))

    # the cells: heads per pass, training loops, agreement
    passes: Counter[int] = Counter()
    loop_a = loop_b = diff = 0.0
    identical = 0
    steps = set()
    for lab, head, seed in cells:
        a, b = grid[lab, head, seed], runs / f"{lab}-{head}-seed{seed}"
        ca, cb = cell_config(a), cell_config(b)
        passes[ca["result"]["heads_in_pass"]] += 1
        loop_a, loop_b = loop_a + ca["result"]["seconds"], loop_b + cb["result"]["seconds"]
        steps.add((ca["result"]["steps"], cb["result"]["steps"]))
        ma, mb = (json.loads(RunFiles(r).metrics.read_text())["miou"] for r in (a, b))
        diff = max(diff, abs(ma - mb))
        identical += RunFiles(a).head.read_bytes() == RunFiles(b).head.read_bytes()

    n = len(cells)
    a_wall, b_wall = side_a.walls[0], sum(side_b.walls)
    imported = "imported before both sides" if args.preimport else "imported by each side"
    print(f"\n{args.labels} x {args.heads} x {args.seeds} seeds = {n} cells; {args.train} train / {args.val} val images; "
          f"steps per cell (A, B): {sorted(steps)}; label sets {imported}")  # fmt: skip
    print_table(
        ("side", "cells", "wall s", "per cell s", "CPU s", "training loops s", "others' CPU"),
        [
            ("A: ssvt ablate (one process)", n, f"{a_wall:.1f}", f"{a_wall / n:.2f}", f"{side_a.cpu:.1f}", f"{loop_a:.1f}",
             f"{side_a.others:.0%}"),
            (f"B: {n} x ssvt train-head", n, f"{b_wall:.1f}", f"{b_wall / n:.2f}", f"{side_b.cpu:.1f}", f"{loop_b:.1f}",
             f"{side_b.others:.0%}"),
        ],
    )  # fmt: skip
    ratio = a_wall / b_wall
    goal = "met" if ratio <= 0.5 else "not met"
    print(f"\nratio A / B = {ratio:.3f} wall ({side_a.cpu / side_b.cpu:.3f} in CPU seconds); goal <= 0.5: {goal}")
    print(f"train-head wall per cell: median {statistics.median(walls):.2f} s, min {min(walls):.2f}, max {max(walls):.2f}")
    print("ablate passes: " + ", ".join(f"{count // k} pass(es) of {k} heads" for k, count in sorted(passes.items())))
    print(f"agreement: max |mIoU A - mIoU B| = {diff:.2e}; head files bit-identical in {identical} of {n} cells")
    if args.keep:
        print(f"kept: {root} (logs in {logs})")


if __name__ == "__main__":
    main()
