"""Benchmark: ``evaluate_runs`` under an online protocol (``lin`` by default) for R runs in one call against one run
alone, on the same images. Goal (issue): R = 8 runs cost <= 1.3 x one run, since the backbone dominates and is shared.

On a toy dataset (``--train`` + ``--val`` images), ``--model`` with a **random init** (no real weights on the build
machine) extracts the train and val stores at ``--size``; 8 heads are trained quickly (``--iterations``) on the same
train store with different label sets and heads, so they share backbone and weights and form one group. Then, after
one untimed warm-up of each call, ``--repeats`` interleaved rounds time:

- ``1 run``: ``evaluate_runs([gt-bn-linear], gt, protocol=...)``;
- ``8 runs, one call``: ``evaluate_runs(all 8 runs, ...)``: one backbone pass, 8 heads on its tokens;
- ``8 runs, 8 calls``: the sum of 8 single-run calls, what the sharing saves (in the first ``--separate-rounds``).

Every call uses the same device, batch size and workers. Tables give medians; the ratio is paired per round (median
over rounds). The split of the wall time comes from timers wrapped around library functions by this script:
backbone (``OnlinePredictor._forward``), heads + merge (``_merge_view``: head, window merge, resize to the original
size, softmax, per run), score (``score_image``), write (``write_metrics``: metrics JSON, confusion and worst-image
figures, per run), build (``_backbone``); "other" is the rest (decoding in the DataLoader, argmax, loading runs).
Results and command: BENCHMARKS.md, section 5. Run by hand::

    .venv/bin/python scripts/bench_protocol.py --val 8 --repeats 3    # 21 min on 2 AMD EPYC cores that others kept ~70 % busy
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchlib import cpu_seconds, print_table

import pipeline.inference.evaluate as ev
from pipeline.cache.names import RunFiles
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.devices import pick_device
from pipeline.features.data import find_images
from pipeline.features.extract import extract, store_path
from pipeline.inference.online import OnlinePredictor
from pipeline.toy.dataset import make_toy
from pipeline.training.runs import train_and_evaluate
from pipeline.workspace import Workspace

#: The 8 runs: (label set, head); the first is the single run.
RUNS = (("gt", "bn-linear"), ("eps", "bn-linear"), ("seam", "bn-linear"), ("scribble", "bn-linear"),
        ("point", "bn-linear"), ("vl", "bn-linear"), ("gt", "linear"), ("eps", "mlp"))  # fmt: skip
PARTS = ("backbone", "heads + merge", "score", "write", "build")
TIMERS: dict[str, float] = defaultdict(float)


def timed(part: str, fn: Callable[..., Any], sync: bool) -> Callable[..., Any]:
    """``fn`` adding its wall time to ``TIMERS[part]`` (synchronising CUDA first when ``sync``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if sync:
                torch.cuda.synchronize()
            TIMERS[part] += time.perf_counter() - t

    return wrapper


def instrument(sync: bool) -> None:
    OnlinePredictor._forward = timed("backbone", OnlinePredictor._forward, sync)
    OnlinePredictor._merge_view = timed("heads + merge", OnlinePredictor._merge_view, sync)
    ev.score_image = timed("score", ev.score_image, False)
    ev.write_metrics = timed("write", ev.write_metrics, False)
    ev._backbone = timed("build", ev._backbone, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dinov2_vits14", help="registry name (random init)")
    parser.add_argument("--size", type=int, default=224, help="store size (training only; the protocol sets its own)")
    parser.add_argument("--protocol", default="lin", choices=("lin", "ms"))
    parser.add_argument("--train", type=int, default=16, help="toy training images")
    parser.add_argument("--val", type=int, default=8, help="toy validation images: the images evaluated")
    parser.add_argument("--iterations", type=int, default=20, help="head training steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--separate-rounds", type=int, default=1, help="rounds that also time the 8 single-run calls")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of extract and evaluate_runs")
    parser.add_argument("--batch-size", type=int, default=8, help="backbone windows per batch (evaluate_runs)")
    parser.add_argument(
        "--workdir", default=None, help="a new folder for the toy data, stores and runs, kept (default: a temp dir, removed)"
    )
    args = parser.parse_args()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_protocol_"))
    device = pick_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.machine()}, "
          f"Python {platform.python_version()}, {device}, {args.model} (random init), protocol {args.protocol}, "
          f"batch {args.batch_size}, workers {args.workers}, files under {root}")  # fmt: skip
    instrument(device.type == "cuda")
    try:
        run(root, args, device)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args: argparse.Namespace, device: torch.device) -> None:
    toy = make_toy(root / "toy", n_train=args.train, n_val=args.val, seed=0)
    ws = Workspace.load(toy.workspace)
    assert ws.val_split is not None
    ecfg = ExtractConfig(model=args.model, size=args.size, random_init=True, workers=args.workers, device=str(device))
    for split in (ws.train_split, ws.val_split):
        t = time.perf_counter()
        items = find_images(ws.data_root, split, ws.data_format)
        extract(items, store_path(ecfg, ws.layout, split), ecfg)
        print(f"extract {split}: {len(items)} images in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    run_dirs = []
    for labels, head in RUNS:
        cfg = TrainConfig(labels=labels, head=head, iterations=args.iterations, lr=1e-2, pixels_per_image=1024,
                          device=str(device))  # fmt: skip
        out = root / "runs" / f"{labels}-{head}"
        train_and_evaluate(cfg, ws.label_source(labels), ws, gt=None, out=out)
        run_dirs.append(out)
    print(f"trained {len(RUNS)} heads ({args.iterations} steps each) in {time.perf_counter() - t:.1f} s")
    gt = ws.labels["gt"]
    n_runs = len(run_dirs)

    def call(dirs: list[Path]) -> int:
        """One ``evaluate_runs`` call; returns the backbone windows it ran."""
        ev.evaluate_runs(dirs, gt, protocol=args.protocol, workspace=ws, workers=args.workers, batch_size=args.batch_size,
                         device=args.device)  # fmt: skip
        metrics = json.loads(RunFiles(dirs[0]).metrics_for(args.protocol).read_text())
        return int(metrics["backbone_windows"])

    methods: dict[str, Callable[[], int]] = {
        "1 run": lambda: call(run_dirs[:1]),
        f"{n_runs} runs, one call": lambda: call(run_dirs),
        f"{n_runs} runs, {n_runs} calls (sum)": lambda: sum(call([d]) for d in run_dirs),
    }
    call(run_dirs[:1])  # warm-up, not timed: first model build, first DataLoader, first figures
    call(run_dirs)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    for r in range(args.repeats):
        for name, method in methods.items():
            if name.endswith("(sum)") and r >= args.separate_rounds:
                continue
            TIMERS.clear()
            busy0, own0 = cpu_seconds()
            t = time.perf_counter()
            windows = method()
            wall = time.perf_counter() - t
            busy1, own1 = cpu_seconds()
            others = min(1.0, max(0.0, (busy1 - busy0 - (own1 - own0)) / (wall * (os.cpu_count() or 1))))
            parts = {p: TIMERS[p] for p in PARTS}
            parts.update(other=wall - sum(parts.values()), wall=wall, windows=windows, others=others)
            times[name].append(parts)
            print(f"  round {r + 1} {name:<22} {wall:7.2f} s  ({', '.join(f'{k} {v:.2f}' for k, v in parts.items())})",
                  flush=True)  # fmt: skip

    rows = []
    for name, runs in times.items():
        if not runs:  # e.g. --separate-rounds 0
            continue
        single = times["1 run"][: len(runs)]
        med = {k: statistics.median(p[k] for p in runs) for k in runs[0]}
        ratio = statistics.median(p["wall"] / s["wall"] for p, s in zip(runs, single, strict=True))
        steady = statistics.median(images_part(p) / images_part(s) for p, s in zip(runs, single, strict=True))
        rows.append((name, f"{med['wall']:.2f}", int(med["windows"]), f"{med['wall'] / args.val:.3f}", f"{ratio:.2f}",
                     f"{steady:.2f}", *(f"{med[k]:.2f}" for k in (*PARTS, "other")), f"{med['others']:.0%}"))  # fmt: skip
    print(f"\n{args.val} val images, protocol {args.protocol}; medians of {args.repeats} interleaved rounds, ratios "
          "paired per round against '1 run'; 'ratio w/o fixed': without build and write, the costs paid once per call "
          "and run, not per image")  # fmt: skip
    print_table(("method", "wall s", "backbone windows", "s / image", "ratio", "ratio w/o fixed",
                 *(f"{p} s" for p in (*PARTS, "other")), "others' CPU"), rows)  # fmt: skip


def images_part(parts: dict[str, float]) -> float:
    """The seconds that grow with the number of images: the wall time less backbone build and metrics writing."""
    return parts["wall"] - parts["build"] - parts["write"]


if __name__ == "__main__":
    main()
