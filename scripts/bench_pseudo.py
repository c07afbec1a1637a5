"""Benchmark: from ``cls_labels.npy`` to a trained head (``ssvt pseudo-masks`` + ``train-head``) against
head training alone, and the quality of the CAM pseudo-masks next to the toy SEAM- and EPS-like sets.

On a toy dataset (``--train`` + ``--val`` images), ``dinov2_vits14`` with a **random init** (no real
weights on the build machine) at ``--size`` with the flipped view (``--flip``, as the demo):

1. ``extract`` writes both stores (timed, reported separately);
2. per round, interleaved (A, B, ...):

   - ``cam``: :func:`make_pseudo_masks` (importing ``cls_labels.npy`` again: its label set is deleted
     first; the token classifier; the class maps; the threshold search on the training ground truth;
     writing the masks), then a head trained on label set ``cam`` with :func:`train_and_evaluate`;
   - ``cam-kN``: the same with the K-means refinement (``--kmeans N``), then its head;
   - ``cam-tT``: the same with the threshold fixed at ``--fixed-threshold`` instead of chosen on the
     training split's ground truth (what a run without ground truth gets: 0.3), then its head;
   - ``eps`` (the head-training-alone reference), ``seam`` and ``gt``: a head trained on the toy set,
     imported before the rounds, so only training is timed;

   every head with the same :class:`TrainConfig` (default: the demo's fast one, ``DemoConfig.train``);
3. every head is evaluated on the val split against ``gt`` (not timed), and every label set's own
   mIoU is measured against ``gt`` on the training canvases, on the pixels it labels (not 255), with
   its coverage (the share of ground-truth pixels it labels). ``toy`` gives the SEAM/EPS-like sets'
   mIoU as ``make_toy`` measured it (original resolution).

Seeds are fixed, so every round trains the same heads; mIoU comes from the last round, times are
medians, and each run records the share of CPU that other processes used meanwhile. Results and
command: BENCHMARKS.md, section 4. Run by hand::

    .venv/bin/python scripts/bench_pseudo.py --repeats 3       # ~4.5 minutes on 2 quiet AMD EPYC cores
    .venv/bin/python scripts/bench_pseudo.py --pm-lr 1e-3 --pm-epochs 30 --pm-min-steps 300   # ssvt pseudo-masks defaults
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from benchlib import cpu_seconds, print_table

from pipeline.cache.geometry import IGNORE
from pipeline.cache.labels import LabelSet, ensure_labels
from pipeline.cache.names import label_set_path
from pipeline.cache.store import FeatureStore
from pipeline.config import DemoConfig, ExtractConfig, PseudoMaskConfig, TrainConfig
from pipeline.features.data import find_images
from pipeline.features.extract import extract, store_path
from pipeline.toy.dataset import make_toy
from pipeline.training.evaluate import evaluate
from pipeline.training.metrics import ConfusionMatrix
from pipeline.training.pseudo_masks import PseudoMaskResult, make_pseudo_masks
from pipeline.training.runs import train_and_evaluate
from pipeline.workspace import Workspace

#: One timed run: {part: seconds}, "total" included.
Timed = Callable[[], dict[str, float]]


def others_share(busy0: float, own0: float, wall: float) -> float:
    """Share of the machine's CPU that other processes used since (busy0, own0)."""
    busy1, own1 = cpu_seconds()
    return min(1.0, max(0.0, (busy1 - busy0 - (own1 - own0)) / (wall * (os.cpu_count() or 1))))


def own_quality(labels: LabelSet, gt: LabelSet, indices: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(mIoU on the pixels ``labels`` labels, share of ground-truth pixels it labels), on the canvases."""
    cm, covered, total = ConfusionMatrix(num_classes), 0, 0
    for i in indices:
        mask, target = labels.masks(np.array([i]))[0], gt.masks(np.array([i]))[0]
        labelled = target != IGNORE
        covered, total = covered + int((labelled & (mask != IGNORE)).sum()), total + int(labelled.sum())
        cm.update(mask, np.where(mask == IGNORE, IGNORE, target))
    return cm.miou(), covered / max(1, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dinov2_vits14", help="registry name (random init)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="cache the mirrored view too")
    parser.add_argument("--train", type=int, default=96, help="toy training images")
    parser.add_argument("--val", type=int, default=32, help="toy validation images")
    parser.add_argument("--seed", type=int, default=0, help="toy data, extraction, classifier and heads")
    demo = DemoConfig().train
    parser.add_argument("--lr", type=float, default=demo.lr, help="head learning rate (DemoConfig.train)")
    parser.add_argument("--min-steps", type=int, default=demo.min_steps, help="head steps (DemoConfig.train)")
    parser.add_argument("--epochs", type=int, default=demo.epochs, help="head epochs (DemoConfig.train)")
    parser.add_argument("--batch-size", type=int, default=demo.batch_size, help="head and classifier batch size")
    parser.add_argument(
        "--pixels-per-image", type=int, default=demo.pixels_per_image, help="dense loss on this many pixels (0: all)"
    )
    pm = DemoConfig().pseudo_masks
    parser.add_argument("--pm-lr", type=float, default=pm.lr, help="classifier learning rate (DemoConfig.pseudo_masks)")
    parser.add_argument("--pm-min-steps", type=int, default=pm.min_steps, help="classifier steps (DemoConfig.pseudo_masks)")
    parser.add_argument("--pm-epochs", type=int, default=pm.epochs, help="classifier epochs (DemoConfig.pseudo_masks)")
    parser.add_argument("--kmeans", type=int, default=4, help="clusters of the refined variant (0: leave it out)")
    parser.add_argument(
        "--fixed-threshold", type=float, default=0.3,
        help="variant with this threshold, not chosen on ground truth: what a run without --gt gets (0: leave it out)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for extract")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--dir", default=None, help="folder for temporary files (default: system temp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_pseudo_", dir=args.dir))
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}, {args.model} (random init) at {args.size}"
        f"{' + flip' if args.flip else ''}, files under {root}"
    )
    try:
        rows, timing = run(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.train} train / {args.val} val toy images; times: medians of {args.repeats} interleaved rounds")
    print_table(("label set", "labels' own mIoU %", "coverage %", "toy mIoU %", "head val mIoU %", "labels s", "head s",
                 "total s", "others' CPU"), rows)  # fmt: skip
    print("\nwhere the pseudo-mask seconds go (medians)")
    print_table(timing[0], timing[1:])


def run(root: Path, args: argparse.Namespace) -> tuple[list[tuple], list[tuple]]:
    t0 = time.perf_counter()
    toy = make_toy(root / "toy", n_train=args.train, n_val=args.val, seed=args.seed)
    ws = Workspace.load(toy.workspace)
    assert ws.train_split is not None
    assert ws.val_split is not None
    print(f"toy data: {time.perf_counter() - t0:.1f} s; {dict((k, round(v, 4)) for k, v in toy.summary.items())}")
    ecfg = ExtractConfig(model=args.model, size=args.size, flip=args.flip, random_init=True, workers=args.workers,
                         device="cpu", seed=args.seed)  # fmt: skip
    for split in (ws.train_split, ws.val_split):
        t0 = time.perf_counter()
        items = find_images(ws.data_root, split, ws.data_format)
        extract(items, store_path(ecfg, ws.layout, split), ecfg)
        print(f"extract {split}: {len(items)} images in {time.perf_counter() - t0:.1f} s")
    store = FeatureStore.open(store_path(ecfg, ws.layout, ws.train_split))
    val_path = store_path(ecfg, ws.layout, ws.val_split)
    nc = ws.num_classes
    tcfg = TrainConfig(lr=args.lr, epochs=args.epochs, min_steps=args.min_steps, batch_size=args.batch_size,
                       pixels_per_image=args.pixels_per_image or None, device="cpu", seed=args.seed)  # fmt: skip
    base = PseudoMaskConfig(labels="cls", out_labels="cam", lr=args.pm_lr, epochs=args.pm_epochs,
                            min_steps=args.pm_min_steps, batch_size=args.batch_size, device="cpu", seed=args.seed)  # fmt: skip
    pcfgs = {"cam": base}
    if args.kmeans:
        pcfgs[f"cam-k{args.kmeans}"] = replace(base, out_labels=f"cam-k{args.kmeans}", kmeans=args.kmeans)
    if args.fixed_threshold:
        name = f"cam-t{args.fixed_threshold:g}"
        pcfgs[name] = replace(base, out_labels=name, threshold=args.fixed_threshold)
    sources = {name: ws.label_source(name) for name in ("eps", "seam", "gt")}
    for source in sources.values():  # imported once: the reference times head training alone
        ensure_labels(source, store, num_classes=nc)
    made: dict[str, PseudoMaskResult] = {}

    def head(name: str) -> dict[str, float]:
        t = time.perf_counter()
        outcome = train_and_evaluate(replace(tcfg, labels=name), sources.get(name, name), ws, store_path=store.path,
                                     gt=None, out=root / "runs" / name)  # fmt: skip
        return {"head": time.perf_counter() - t, "head loop": outcome.train.seconds}

    def pseudo(name: str) -> Timed:
        def timed() -> dict[str, float]:
            label_set_path(store.path, "cls").unlink(missing_ok=True)  # the import is part of the time
            stages: dict[str, float] = {}
            t = time.perf_counter()

            def mark(stage: str, done: int, total: int) -> None:
                stages[stage] = time.perf_counter() - t

            made[name] = make_pseudo_masks(store, ws.label_source("cls"), pcfgs[name], num_classes=nc, gt=sources["gt"],
                                           progress=mark)  # fmt: skip
            labels = time.perf_counter() - t
            parts = {"import": stages["import"], "classifier": stages["classifier"] - stages["import"],
                     "class maps": stages["class maps"] - stages["classifier"],
                     "threshold + masks": labels - stages["class maps"]}  # fmt: skip
            return {"labels": labels, **parts, **head(name)}

        return timed

    def head_only(name: str) -> Timed:
        return lambda: head(name)

    methods: dict[str, Timed] = {name: pseudo(name) for name in pcfgs}
    methods.update({name: head_only(name) for name in sources})
    head("gt")  # warm-up, not timed: the first training call of a process pays one-off costs
    times: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    for r in range(args.repeats):
        for name, method in methods.items():
            busy0, own0 = cpu_seconds()
            t = time.perf_counter()
            parts = method()
            wall = time.perf_counter() - t
            parts.update(total=wall, others=others_share(busy0, own0, wall))
            times[name].append(parts)
            print(f"  round {r + 1} {name:<8} {wall:7.2f} s  ({', '.join(f'{k} {v:.2f}' for k, v in parts.items())})", flush=True)

    gt_set = ensure_labels(sources["gt"], store, num_classes=nc)
    train_ids = np.arange(store.n_images)
    rows: list[tuple] = []
    timing: list[tuple[str, ...]] = [("label set", "import", "classifier", "class maps", "threshold + masks", "threshold")]
    for name, runs in times.items():
        labels = made[name].labels if name in made else ensure_labels(sources[name], store, num_classes=nc)
        miou, coverage = own_quality(labels, gt_set, train_ids, nc)
        ev = evaluate(root / "runs" / name, sources["gt"], store_path=val_path, device="cpu")
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        toy_miou = toy.summary.get(f"miou_{name}")
        rows.append((name, f"{100 * miou:.1f}", f"{100 * coverage:.0f}", f"{100 * toy_miou:.1f}" if toy_miou else "-",
                     f"{100 * ev.miou:.1f}", f"{med['labels']:.1f}" if "labels" in med else "-", f"{med['head']:.1f}",
                     f"{med['total']:.1f}", f"{med['others']:.0%}"))  # fmt: skip
        if name in made:
            res = made[name]
            if abs(res.quality["miou"] - miou) > 1e-6:
                raise RuntimeError(f"{name}: make_pseudo_masks measured mIoU {res.quality['miou']}, the bench {miou}")
            timing.append((name, *(f"{med[k]:.2f}" for k in timing[0][1:-1]), f"{res.threshold:.2f} ({res.threshold_source})"))
    return rows, timing


if __name__ == "__main__":
    main()
