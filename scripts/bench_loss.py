"""Benchmark: sparse loss (upsampled logits only at labelled pixels) vs full upsampling + masked CE.

Forward + backward time on the CPU for scribble-like labels (a few 3-px polylines per image) and point
labels (a handful of pixels), with the loss values side by side. Run by hand::

    python scripts/bench_loss.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.training.losses import dense_loss, labelled_pixels, samples_loss, sparse_loss


def scribble_labels(b: int, size: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """(b, size, size) uint8: per image 4-6 polylines of 3 px width (3-4 strokes of 50-110 px each,
    about 1-2% of the pixels, like ScribbleSup), one class each, 255 elsewhere."""
    out = np.full((b, size, size), 255, dtype=np.uint8)
    for i in range(b):
        canvas = Image.fromarray(out[i])
        draw = ImageDraw.Draw(canvas)
        for _ in range(rng.integers(4, 7)):
            angles = rng.uniform(0, 2 * np.pi, size=rng.integers(3, 5))
            steps = rng.uniform(50, 110, size=angles.size)[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
            pts = np.clip(rng.uniform(0, size - 1, size=2) + np.cumsum(steps, axis=0), 0, size - 1)
            draw.line([tuple(p) for p in pts], fill=int(rng.integers(0, k)), width=3)
        out[i] = np.asarray(canvas)
    return torch.from_numpy(out)


def point_labels(b: int, size: int, k: int, rng: np.random.Generator, n: int = 8) -> torch.Tensor:
    """(b, size, size) uint8: ``n`` single labelled pixels per image, 255 elsewhere."""
    out = np.full((b, size, size), 255, dtype=np.uint8)
    for i in range(b):
        y, x = rng.integers(0, size, size=(2, n))
        out[i, y, x] = rng.integers(0, k, size=n)
    return torch.from_numpy(out)


def time_fb(fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, repeats: int) -> tuple[float, float, torch.Tensor]:
    """Median seconds of forward + backward, the loss value and the gradient w.r.t. the logits."""
    times, value = [], float("nan")
    for _ in range(repeats + 1):  # the first run warms up
        logits.grad = None
        t0 = time.perf_counter()
        loss = fn(logits)
        loss.backward()
        times.append(time.perf_counter() - t0)
        value = loss.item()
    assert logits.grad is not None
    return statistics.median(times[1:]), value, logits.grad.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--size", type=int, default=448, help="label (canvas) resolution S")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    logits = torch.randn(args.batch, args.classes, args.grid, args.grid, generator=torch.Generator().manual_seed(0))
    logits.requires_grad_(True)
    label_sets = {
        "scribble": scribble_labels(args.batch, args.size, args.classes, rng),
        "point": point_labels(args.batch, args.size, args.classes, rng),
    }
    print(
        f"B={args.batch} K={args.classes} grid={args.grid}x{args.grid} S={args.size} threads={args.threads}, "
        f"forward+backward, median of {args.repeats}"
    )
    header = f"{'labels':<9} {'labelled':>9} {'method':<22} {'ms':>9} {'speed-up':>9} {'loss':>12} {'|dloss|':>8} {'|dgrad|':>8}"
    print(header)
    print("-" * len(header))
    for name, labels in label_sets.items():
        frac = (labels != 255).float().mean().item()
        per_image = [labelled_pixels(labels[i]) for i in range(args.batch)]
        size = (args.size, args.size)
        methods: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "dense (upsample + CE)": partial(dense_loss, labels=labels),
            "sparse_loss": partial(sparse_loss, labels=labels),
            "samples_loss (precomp)": partial(samples_loss, samples=per_image, label_size=size),
        }
        results = {method: time_fb(fn, logits, args.repeats) for method, fn in methods.items()}
        base_t, base_v, base_g = results["dense (upsample + CE)"]
        for method, (t, v, g) in results.items():
            print(
                f"{name:<9} {frac:>8.3%} {method:<22} {t * 1e3:>9.2f} {base_t / t:>8.1f}x {v:>12.6f} "
                f"{abs(v - base_v):>8.1e} {(g - base_g).abs().max().item():>8.1e}"
            )


if __name__ == "__main__":
    main()
