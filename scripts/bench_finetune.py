"""Benchmark: one ``ssvt finetune`` epoch against one cached ``train-head`` epoch, same images and head.

With a ViT-S/14-shaped random model (``dinov2_vits14``, random init) at ``--size`` (224) on toy images:

1. ``extract`` writes the training cache with the flipped view (timed, not part of any epoch) and the
   ground truth is imported as the label set both methods read;
2. per round, interleaved: one epoch of ``train_head`` from the cache (features in RAM), one epoch of
   ``finetune`` (decoding in ``--workers`` DataLoader workers, the backbone forward and backward,
   AdamW on head and backbone), and the same with gradient checkpointing (what a GPU run does by
   default). Two times each: the training loop (``TrainResult.seconds``) and the whole call (loading
   features or the backbone copy, writing the run folder; finetune also writes backbone.safetensors).

The ratio is paired within each round (finetune / cache) and the median reported, with the share of
CPU other processes used meanwhile. Run by hand::

    .venv/bin/python scripts/bench_finetune.py                    # ~3 minutes on 2 cores
    .venv/bin/python scripts/bench_finetune.py --images 64 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchlib import cpu_seconds, print_table

from pipeline.cache.labels import LabelSet, ensure_labels
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig, FinetuneConfig, TrainConfig
from pipeline.features.backbones import Backbone
from pipeline.features.data import find_images
from pipeline.features.extract import extract, load_backbone
from pipeline.toy.dataset import make_toy
from pipeline.training.finetune import finetune
from pipeline.training.train import train_head
from pipeline.workspace import Workspace

NUM_CLASSES = 21
#: One timed run: (seconds of the training loop, seconds of the whole call, steps).
Timed = Callable[[], tuple[float, float, int]]


def cache_epoch(store: FeatureStore, labels: LabelSet, cfg: TrainConfig, run_dir: Path) -> Timed:
    def run() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        result = train_head(store, labels, cfg, run_dir, num_classes=NUM_CLASSES)
        return result.seconds, time.perf_counter() - t0, result.steps

    return run


def finetune_epoch(store: FeatureStore, labels: LabelSet, cfg: TrainConfig, ft: FinetuneConfig, backbone: Backbone,
                   run_dir: Path) -> Timed:  # fmt: skip
    def run() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        result = finetune(store, labels, cfg, ft, run_dir, num_classes=NUM_CLASSES, backbone=backbone)
        return result.seconds, time.perf_counter() - t0, result.steps

    return run


def interleaved(methods: dict[str, Timed], repeats: int) -> dict[str, list[tuple[float, float, int, float]]]:
    """Each method once per round: (loop s, whole call s, steps, others' share of the CPU) per run."""
    times: dict[str, list[tuple[float, float, int, float]]] = {name: [] for name in methods}
    cpus = os.cpu_count() or 1
    for r in range(repeats):
        for name, run in methods.items():
            busy0, own0 = cpu_seconds()
            t0 = time.perf_counter()
            loop, whole, steps = run()
            wall = time.perf_counter() - t0
            busy1, own1 = cpu_seconds()
            others = min(1.0, max(0.0, (busy1 - busy0 - (own1 - own0)) / (wall * cpus)))
            times[name].append((loop, whole, steps, others))
            print(f"  round {r + 1} {name:<28} {loop:8.2f} s  (whole call {whole:7.2f} s, others' CPU {others:4.0%})", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32, help="training images (toy)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-checkpointing-row", action="store_true", help="skip the gradient-checkpointing variant")
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {cpu}")
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        root = Path(tmp)
        toy = make_toy(root / "toy", n_train=args.images, n_val=1, seed=0)
        ws = Workspace.load(toy.workspace)
        xcfg = ExtractConfig(model=args.model, random_init=True, size=args.size, flip=True, workers=args.workers, device="cpu")
        path = root / "cache" / "train.zarr"
        t0 = time.perf_counter()
        extract(find_images(ws.data_root, "train"), path, xcfg)
        print(f"extract: {args.images} images at {args.size} (two views) in {time.perf_counter() - t0:.1f} s")
        store = FeatureStore.open(path)
        labels = ensure_labels(ws.labels["gt"], store, num_classes=NUM_CLASSES)
        backbone = load_backbone(xcfg)
        cfg = TrainConfig(labels="gt", epochs=1, min_steps=0, batch_size=args.batch_size, device="cpu", memory="ram")
        methods = {
            "train-head (cache)": cache_epoch(store, labels, cfg, root / "runs" / "head"),
            "finetune": finetune_epoch(store, labels, cfg, FinetuneConfig(workers=args.workers), backbone, root / "runs" / "ft"),
        }
        if not args.no_checkpointing_row:
            ckpt = FinetuneConfig(workers=args.workers, grad_checkpointing=True)
            methods["finetune + checkpointing"] = finetune_epoch(store, labels, cfg, ckpt, backbone, root / "runs" / "ftc")
        times = interleaved(methods, args.repeats)
    cache = times["train-head (cache)"]
    rows = []
    for name, runs in times.items():
        ratio = [runs[r][0] / cache[r][0] for r in range(len(runs))]
        whole = [runs[r][1] / cache[r][1] for r in range(len(runs))]
        loop, call = statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs)
        rows.append((name, runs[0][2], f"{loop:.2f}", f"{call:.2f}", f"{statistics.median(ratio):.1f}x",
                     f"{statistics.median(whole):.1f}x", f"{statistics.median(t[3] for t in runs):.0%}"))  # fmt: skip
    setting = f"{args.images} images, batch {args.batch_size}, {args.model} random init at {args.size}"
    print(f"\none epoch, {setting}; medians of {args.repeats} rounds")
    print_table(("method", "steps", "loop s", "whole s", "loop / cache", "whole / cache", "others' CPU"), rows)


if __name__ == "__main__":
    main()
