"""Benchmark: feature extraction throughput (images/s) against the backbone's forward-only speed.

For each canvas size, with a ViT-S/14-shaped random model (``dinov2_vits14``, random init, fp32 on
the CPU), several ways of producing the patch tokens of the same toy JPEGs (resaved at VOC's 500 px)
are timed:

- ``forward``: the backbone alone on preprocessed tensors held in memory (same batch size, under
  ``torch.inference_mode``): the baseline;
- ``extract-wN``: :func:`pipeline.features.extract.extract` end to end from JPEG files with N DataLoader
  workers (decode + resize in workers, float16 tokens, shards written by a background thread). Three
  times are kept: the loop (``ExtractSummary.seconds``), the whole call (``wall``: store creation,
  weight fingerprint and worker start-up included) and the steady rate after the first shard;
- ``naive``: one image at a time, decode + resize in the main process, fp32 forward, one ``np.save``
  per image;
- diagnostics with ``--extra``: ``forward16`` (extract's ``Forward``: + fp16 conversion to numpy),
  ``forward-bN`` (batch N), ``forward-tN`` (N torch threads), ``extract-nowrite`` (no shard writes).

Other processes may share the cores, so methods are interleaved (A, B, C, A, B, C, ...), ratios are
paired within each round, medians are reported, and each run records the share of CPU that others
used; "quiet" columns keep only rounds where that stayed under ``--quiet``. The goal is
extract >= 0.85 x forward-only. Results and commands: BENCHMARKS.md. Run by hand::

    .venv/bin/python scripts/bench_extract.py                          # ~1.5 minutes on 2 quiet cores
    .venv/bin/python scripts/bench_extract.py --sizes 224 --images 96 --repeats 4 --workers 0,2 --extra forward16
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
from pathlib import Path

import numpy as np
import torch
from benchlib import cpu_seconds, print_table
from PIL import Image

from pipeline.cache.geometry import fit_geometry
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig
from pipeline.features.backbones import Backbone, build_backbone, resolve_layers
from pipeline.features.data import CanvasDataset, ImageItem, find_images, load_rgb
from pipeline.features.extract import Forward, extract
from pipeline.resample import image_to_canvas
from pipeline.toy.dataset import make_toy

#: One timed run: (seconds of the timed loop, of the whole call, and of the loop at its steady rate).
Timed = Callable[[], tuple[float, float, float]]


def upscale(items: list[ImageItem], longer: int) -> None:
    """Resave each JPEG with its longer side ``longer`` px (toy images are small; VOC's are 500 px)."""
    for item in items:
        with Image.open(item.path) as im:
            scale = longer / max(im.size)
            im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC).save(item.path, quality=90)


def preprocess(items: list[ImageItem], size: int, backbone: Backbone) -> torch.Tensor:
    """(N, 3, S, S) float32 canvases of ``items``, exactly as ``extract`` feeds them to the model."""
    dataset = CanvasDataset(items, size, backbone.mean, backbone.std)
    return torch.stack([dataset[i][1] for i in range(len(items))])


def forward_only(backbone: Backbone, pixels: torch.Tensor, layers: tuple[int, ...], batch: int, threads: int = 0) -> Timed:
    """The model alone on in-memory canvases; ``threads`` > 0 sets torch's intra-op threads for this run."""

    def run() -> tuple[float, float, float]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(pixels), batch):
                    backbone(pixels[i : i + batch], layers)
            dt = time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)
        return dt, dt, dt

    return run


def forward_fp16(backbone: Backbone, pixels: torch.Tensor, layers: tuple[int, ...], batch: int) -> Timed:
    """extract's ``Forward`` (model + float16 conversion to numpy), on in-memory tensors."""
    forward = Forward(backbone, layers, torch.device("cpu"), flip=False, chunk=batch)

    def run() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        for i in range(0, len(pixels), batch):
            forward(pixels[i : i + batch])
        dt = time.perf_counter() - t0
        return dt, dt, dt

    return run


def extract_run(items: list[ImageItem], out: Path, cfg: ExtractConfig, backbone: Backbone) -> Timed:
    def run() -> tuple[float, float, float]:
        marks: list[tuple[int, float]] = []  # (images done, time) after each finished shard
        t0 = time.perf_counter()
        summary = extract(
            items, out, cfg, overwrite=True, backbone=backbone, progress=lambda d, _: marks.append((d, time.perf_counter()))
        )
        wall = time.perf_counter() - t0
        if summary.images_done != len(items) or summary.failed:
            raise RuntimeError(f"extract did {summary.images_done} of {len(items)} images, failed: {summary.failed}")
        (d0, t_first), (d1, t_last) = marks[1], marks[-1]  # marks[0] is the (0, total) call before the loop
        steady = (t_last - t_first) / (d1 - d0) * len(items) if d1 > d0 else summary.seconds
        return summary.seconds, wall, steady

    return run


def extract_cfg(args: argparse.Namespace, size: int, workers: int) -> ExtractConfig:
    return ExtractConfig(
        model=args.model, size=size, random_init=True, batch_size=args.batch_size, workers=workers, device="cpu",
        images_per_shard=args.images_per_shard,
    )  # fmt: skip


def no_writes(run: Timed) -> Timed:
    """Diagnostic: ``run`` with FeatureStore.write_shard doing nothing, to see what writing costs."""

    def wrapped() -> tuple[float, float, float]:
        real = FeatureStore.write_shard
        FeatureStore.write_shard = lambda self, shard, *arrays: None  # type: ignore[method-assign]
        try:
            return run()
        finally:
            FeatureStore.write_shard = real  # type: ignore[method-assign]

    return wrapped


def naive_run(items: list[ImageItem], out: Path, size: int, backbone: Backbone, layers: tuple[int, ...]) -> Timed:
    """Decode, resize and run the model one image at a time in the main process; one .npy per image."""

    def run() -> tuple[float, float, float]:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        for item in items:
            image = load_rgb(item.path)
            pixels = image_to_canvas(image, fit_geometry(image.height, image.width, size), backbone.mean, backbone.std)
            with torch.inference_mode():
                tokens, _ = backbone(pixels[None], layers)
            np.save(out / f"{item.id}.npy", tokens[0].numpy())
        dt = time.perf_counter() - t0
        return dt, dt, dt

    return run


def interleaved(methods: dict[str, Timed], repeats: int) -> dict[str, list[tuple[float, float, float, float]]]:
    """Run every method once per round (A, B, C, A, B, C, ...): (loop s, wall s, steady s, share of
    the machine's CPU that other processes used meanwhile) of each run."""
    times: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in methods}
    cpus = os.cpu_count() or 1
    for r in range(repeats):
        for name, run in methods.items():
            busy0, own0 = cpu_seconds()
            loop, wall, steady = run()
            busy1, own1 = cpu_seconds()
            others = min(1.0, max(0.0, (busy1 - busy0 - (own1 - own0)) / (wall * cpus)))
            times[name].append((loop, wall, steady, others))
            print(
                f"  round {r + 1} {name:<12} loop {loop:7.2f} s  wall {wall:7.2f} s  steady {steady:7.2f} s  "
                f"others' CPU {others:4.0%}",
                flush=True,
            )
    return times


def bench_size(size: int, items: list[ImageItem], backbone: Backbone, root: Path, args: argparse.Namespace) -> list[tuple]:
    layers = resolve_layers("last", backbone.depth)
    pixels = preprocess(items, size, backbone)
    with torch.inference_mode():  # warm-up: first calls pay one-off kernel selection
        backbone(pixels[: args.batch_size], layers)
        backbone(pixels[:1], layers)  # the naive loop's batch of one
    methods: dict[str, Timed] = {"forward": forward_only(backbone, pixels, layers, args.batch_size)}
    for extra in filter(None, args.extra.split(",")):
        if extra == "forward16":
            methods[extra] = forward_fp16(backbone, pixels, layers, args.batch_size)
        elif extra.startswith("forward-b"):
            methods[extra] = forward_only(backbone, pixels, layers, int(extra.removeprefix("forward-b")))
        elif extra.startswith("forward-t"):
            methods[extra] = forward_only(backbone, pixels, layers, args.batch_size, int(extra.removeprefix("forward-t")))
        elif extra == "extract-nowrite":
            methods[extra] = no_writes(extract_run(items, root / f"{size}-nowrite.zarr", extract_cfg(args, size, 2), backbone))
        else:
            raise SystemExit(f"unknown --extra {extra!r}: use forward16, forward-bN, forward-tN or extract-nowrite")
    for workers in (int(w) for w in args.workers.split(",")):
        cfg = extract_cfg(args, size, workers)
        methods[f"extract-w{workers}"] = extract_run(items, root / f"{size}-w{workers}.zarr", cfg, backbone)
    if not args.no_naive:
        methods["naive"] = naive_run(items, root / f"naive-{size}", size, backbone, layers)
    print(f"size {size}: {len(items)} images, batch {args.batch_size}, {args.repeats} interleaved rounds", flush=True)
    times = interleaved(methods, args.repeats)
    return summarize(size, len(items), times, args.quiet)


def summarize(size: int, n: int, times: dict[str, list[tuple[float, float, float, float]]], quiet: float) -> list[tuple]:
    """Rows of the result table. Ratios are paired: forward time / method time within each round,
    then the median over all rounds, and over the quiet rounds (others' CPU < ``quiet`` in every run)."""
    base = times["forward"]
    rounds = range(len(base))
    calm = [r for r in rounds if all(runs[r][3] < quiet for runs in times.values())]
    rows = []
    for name, runs in times.items():
        ratios = [[base[r][0] / runs[r][k] for r in rounds] for k in range(3)]  # loop, wall, steady
        calm_ratio = f"{statistics.median(ratios[0][r] for r in calm):.2f}" if calm else "-"
        calm_speed = f"{n / statistics.median(runs[r][0] for r in calm):.2f}" if calm else "-"
        rows.append((size, name, f"{n / statistics.median(t[0] for t in runs):.2f}", calm_speed,
                     *(f"{statistics.median(x):.2f}" for x in ratios), calm_ratio,
                     f"{len(calm)}/{len(base)}", f"{statistics.median(t[3] for t in runs):.0%}"))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dinov2_vits14", help="registry name (random init)")
    parser.add_argument("--sizes", default="224,448", help="comma list of canvas sizes")
    parser.add_argument("--images", type=int, default=24, help="toy images per size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images-per-shard", type=int, default=8, help="small, so a few shards are written")
    parser.add_argument("--workers", default="2", help="comma list of DataLoader worker counts for extract")
    parser.add_argument(
        "--extra", default="",
        help="comma list of extra methods: forward16 (extract's Forward, fp16 numpy output), forward-bN (batch N), "
        "forward-tN (N torch threads), extract-nowrite (extract with 2 workers, shard writes skipped)",
    )  # fmt: skip
    parser.add_argument("--upscale", type=int, default=500, help="resave toy JPEGs at this longer side (VOC: 500); 0: keep")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive one-image loop")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--quiet", type=float, default=0.1, help="a round is quiet when others used less CPU than this")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--dir", default=None, help="folder for temporary files (default: system temp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="bench_extract_", dir=args.dir))
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}, model {args.model} (random init), files under {root}"
    )
    try:
        toy = make_toy(root / "toy", n_train=args.images, n_val=1)
        items = find_images(toy.voc_root, split="train")
        if args.upscale:
            upscale(items, args.upscale)
        backbone = build_backbone(args.model, None, seed=0)
        rows: list[tuple] = []
        for size in (int(s) for s in args.sizes.split(",")):
            rows += bench_size(size, items, backbone, root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        "\nimages/s of the extraction loop (median over all rounds, and over quiet rounds); ratio = throughput / "
        "forward-only throughput, paired per round (loop, whole call, steady rate after the first shard, loop in quiet rounds)"
    )
    header = ("size", "method", "img/s", "img/s quiet", "ratio loop", "wall", "steady", "quiet", "quiet rounds", "others' CPU")
    print_table(header, rows)


if __name__ == "__main__":
    main()
