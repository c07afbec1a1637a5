"""Benchmark: one epoch of head training from the feature cache against the same head trained online.

With a ViT-S/14-shaped random model (``dinov2_vits14``, random init) at 448 on toy images:

1. ``extract`` writes the cache (timed, reported separately, not part of any epoch);
2. per label set, one epoch of ``train_head(epochs=1)`` from the cache, with the features loaded
   into RAM (``memory="ram"``) and streamed from the store (``memory="stream"``). Two times: the
   training loop (``TrainResult.seconds``) and the whole call (loading features and masks, writing
   the run folder);
3. the same head trained online, as peers do: a DataLoader decodes and resizes the JPEGs (same
   workers as extract), the frozen backbone runs on every batch under ``inference_mode``, then head
   forward, the same loss, backward and an AdamW step. Measured on ``--online-batches`` batches and
   extrapolated to the epoch (time per image x images). The masks come already aligned from the
   label set, which favours the online path (peers decode a PNG per image as well);
4. streaming the store (``iter_shards`` in order and shuffled, and the training reader
   ``FeatureBatches`` in stream mode) against reading the same bytes through a numpy memmap, on a
   store with the default shard size filled with tiled cached tokens. Reads come from the page cache.

Measurements of the compared methods are interleaved (A, B, A, B, ...) and medians reported, since
other processes may share the cores; speed-ups are paired within each round, and each run records the
share of CPU that others used ("quiet" columns keep rounds where that stayed under ``--quiet``).
Goals: cache epoch >= 50x faster than online; streaming >= 0.7x the memmap's throughput. The
streaming table also has a prototype reader (:func:`direct_reads`, not library code) that shows what
the store's layout allows. Results and commands: BENCHMARKS.md. Run by hand::

    .venv/bin/python scripts/bench_train.py                     # ~1.5 minutes on 2 quiet cores
    .venv/bin/python scripts/bench_train.py --images 200 --labels gt,gt:2000,scribble,point --online-batches 3 --repeats 3
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

from pipeline.cache.labels import LabelSet, ensure_labels
from pipeline.cache.schema import default_images_per_shard
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.features.backbones import Backbone, build_backbone
from pipeline.features.data import CanvasDataset, ImageItem, find_images
from pipeline.features.extract import extract
from pipeline.heads import build_head
from pipeline.toy.dataset import make_toy
from pipeline.training.losses import dense_loss, sparse_loss, subsampled_dense_loss
from pipeline.training.train import FeatureBatches, train_head
from pipeline.workspace import Workspace

MB = 2**20
NUM_CLASSES = 21
#: One timed run: (seconds of the measured part, seconds of the whole call, images it covers).
Timed = Callable[[], tuple[float, float, int]]


def loss_fn(labels: LabelSet, pixels: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss train_head uses for this label set and ``pixels_per_image``."""
    if labels.sparse:
        return sparse_loss
    if pixels is not None:
        generator = torch.Generator().manual_seed(0)
        return lambda logits, target: subsampled_dense_loss(logits, target, pixels, generator)
    return dense_loss


def cache_epoch(store: FeatureStore, labels: LabelSet, memory: str, pixels: int | None, args: argparse.Namespace,
                run_dir: Path) -> Timed:  # fmt: skip
    cfg = TrainConfig(
        labels=labels.name, epochs=1, min_steps=0, batch_size=args.batch_size, flip=False, device="cpu", memory=memory,
        pixels_per_image=pixels,
    )  # fmt: skip

    def run() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        result = train_head(store, labels, cfg, run_dir, num_classes=NUM_CLASSES)
        if result.epochs != 1:
            raise RuntimeError(f"train_head ran {result.epochs} epochs ({result.steps} steps), expected one")
        return result.seconds, time.perf_counter() - t0, result.images

    return run


def online_epoch(
    items: list[ImageItem], backbone: Backbone, labels: LabelSet, pixels: int | None, args: argparse.Namespace
) -> Timed:
    """Decode + backbone + head on ``args.online_batches`` batches; the time is per image x len(items)."""
    masks = torch.from_numpy(labels.masks(np.arange(len(items))))  # (N, S, S) uint8, store order = items order
    dataset = CanvasDataset(items, args.size, backbone.mean, backbone.std)
    layers = (backbone.depth - 1,)
    loss = loss_fn(labels, pixels)

    def run() -> tuple[float, float, int]:
        torch.manual_seed(0)
        head = build_head("bn-linear", backbone.hidden_size, NUM_CLASSES)
        optim = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
            prefetch_factor=4 if args.workers else None,
        )  # fmt: skip
        done, t0 = 0, time.perf_counter()
        for b, (indices, pixels, _, _) in enumerate(loader):
            if b == args.online_batches:
                break
            with torch.inference_mode():
                tokens, _ = backbone(pixels, layers)
            logits = head(tokens.clone())  # out of inference mode, so autograd can use it
            value = loss(logits, masks[indices])
            optim.zero_grad(set_to_none=True)
            value.backward()
            optim.step()
            done += len(indices)
        dt = time.perf_counter() - t0
        return dt / done * len(items), dt, len(items)

    return run


def interleaved(methods: dict[str, Timed], repeats: int) -> dict[str, list[tuple[float, float, int, float]]]:
    """Run every method once per round (A, B, C, A, B, C, ...): (measured s, whole call s, images,
    share of the machine's CPU that other processes used meanwhile) of each run."""
    times: dict[str, list[tuple[float, float, int, float]]] = {name: [] for name in methods}
    cpus = os.cpu_count() or 1
    for r in range(repeats):
        for name, run in methods.items():
            busy0, own0 = cpu_seconds()
            t0 = time.perf_counter()
            main, whole, n = run()
            wall = time.perf_counter() - t0
            busy1, own1 = cpu_seconds()
            others = min(1.0, max(0.0, (busy1 - busy0 - (own1 - own0)) / (wall * cpus)))
            times[name].append((main, whole, n, others))
            print(f"  round {r + 1} {name:<22} {main:8.2f} s  (whole call {whole:7.2f} s, others' CPU {others:4.0%})", flush=True)
    return times


def bench_epochs(store: FeatureStore, ws: Workspace, items: list[ImageItem], backbone: Backbone, root: Path,
                 args: argparse.Namespace) -> list[tuple]:  # fmt: skip
    rows = []
    for spec in args.labels.split(","):
        source, _, px = spec.partition(":")
        pixels = int(px) if px else None
        t0 = time.perf_counter()
        labels = ensure_labels(ws.label_source(source), store, num_classes=NUM_CLASSES)
        print(f"labels {source!r} ({'sparse' if labels.sparse else 'dense'}): imported in {time.perf_counter() - t0:.1f} s")
        name = f"{source}:{pixels}px" if pixels and not labels.sparse else source
        methods = {
            f"{name} cache ram": cache_epoch(store, labels, "ram", pixels, args, root / "runs" / f"{spec}-ram"),
            f"{name} cache stream": cache_epoch(store, labels, "stream", pixels, args, root / "runs" / f"{spec}-stream"),
            f"{name} online": online_epoch(items, backbone, labels, pixels, args),
        }
        times = interleaved(methods, args.repeats)
        rows += summarize(name, times, args.quiet)
    return rows


def summarize(name: str, times: dict[str, list[tuple[float, float, int, float]]], quiet: float) -> list[tuple]:
    """Rows of the epoch table. Speed-ups are paired: online time / cache time within each round, then
    the median over all rounds and over quiet rounds (others' CPU < ``quiet`` in every run of it)."""
    online = times[f"{name} online"]
    rounds = range(len(online))
    calm = [r for r in rounds if all(runs[r][3] < quiet for runs in times.values())]
    rows = []
    for method, runs in times.items():
        n = runs[0][2]
        epoch = statistics.median(t[0] for t in runs)
        others = f"{statistics.median(t[3] for t in runs):.0%}"
        calm_epoch = f"{statistics.median(runs[r][0] for r in calm):.2f}" if calm else "-"
        if method.endswith("online"):
            rows.append((name, "online (extrapolated)", f"{epoch:.2f}", calm_epoch, f"{n / epoch:.2f}", "-", *"111", others))
            continue
        loop = [online[r][0] / runs[r][0] for r in rounds]
        whole = [online[r][0] / runs[r][1] for r in rounds]
        calm_up = f"{statistics.median(loop[r] for r in calm):.0f}x" if calm else "-"
        rows.append((name, f"cache {method.split()[-1]}", f"{epoch:.2f}", calm_epoch, f"{n / epoch:.1f}",
                     f"{statistics.median(t[1] for t in runs):.2f}", f"{statistics.median(loop):.0f}x",
                     f"{statistics.median(whole):.0f}x", calm_up, others))  # fmt: skip
    return rows


def stream_store(path: Path, source: FeatureStore, n: int) -> FeatureStore:
    """A store of ``n`` images with the default shard size, filled with ``source``'s tokens tiled."""
    tokens = source.read_tokens(0, source.n_images)
    per_shard = default_images_per_shard(source.grid, source.channels, source.n_views)
    store = FeatureStore.create(
        path, ids=[f"img{i:06d}" for i in range(n)], views=source.views, grid=source.grid, channels=source.channels,
        attrs={k: source.attrs[k] for k in ("backbone", "layers", "size")}, images_per_shard=per_shard,
    )  # fmt: skip
    for shard in range(store.n_shards):
        a, b = store.shard_range(shard)
        idx = np.arange(a, b) % source.n_images
        cls = np.zeros((b - a, source.n_views, source.channels), np.float16)
        store.write_shard(shard, tokens[idx], cls, np.zeros((b - a, 6), np.int32), np.ones(b - a, np.uint8))
    return store


def direct_reads(store: FeatureStore, buf: np.ndarray, per_read: int) -> Callable[[], float]:
    """Prototype (not library code): read the uncompressed shards of ``tokens`` with ``os.preadv``
    straight into ``buf``, locating chunks through the zarr v3 sharding index (``per_shard`` pairs of
    little-endian uint64 offset, length, then a 4-byte CRC32C, at the end of each shard file)."""
    per_shard, image_bytes = store.images_per_shard, buf[0].nbytes

    def shard(k: int) -> np.ndarray:
        start, stop = store.shard_range(k)
        n = stop - start
        with open(store.path / "tokens" / "c" / str(k) / "0" / "0" / "0" / "0", "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            raw = os.pread(f.fileno(), per_shard * 16, size - per_shard * 16 - 4)
            index = np.frombuffer(raw, "<u8").reshape(per_shard, 2)[:n].astype(np.int64)
            if (index[:, 1] != image_bytes).any() or (np.diff(index[:, 0]) != image_bytes).any():
                raise RuntimeError(f"shard {k}: chunks are not contiguous whole images; the prototype needs that")
            for a in range(0, n, per_read):
                b = min(n, a + per_read)
                os.preadv(f.fileno(), [buf[a:b].reshape(-1).view(np.uint8)], int(index[0, 0]) + a * image_bytes)  # type: ignore[list-item]
        return buf[:n]

    for k in range(store.n_shards):  # the prototype must read what the store reads
        if not np.array_equal(shard(k), store.read_tokens(*store.shard_range(k))):
            raise RuntimeError(f"prototype read of shard {k} differs from FeatureStore.read_tokens")

    def run() -> float:
        t0 = time.perf_counter()
        for k in range(store.n_shards):
            shard(k)
        return time.perf_counter() - t0

    return run


def bench_stream(store: FeatureStore, root: Path, args: argparse.Namespace) -> list[tuple]:
    """Read one epoch of a default-shard store several ways; MB/s against numpy memmap references."""
    big = stream_store(root / "stream.zarr", store, args.stream_images)
    reference = root / "stream.npy"
    np.save(reference, big.read_tokens(0, big.n_images))
    nbytes, per_read, per_shard = big.raw_token_bytes(), 8, big.images_per_shard
    shard_buf = np.zeros((per_shard, *big.read_tokens(0, 1).shape[1:]), np.float16)  # reused across epochs

    def memmap(into_shard: bool) -> Callable[[], float]:
        """In order, ``per_read`` images per copy into a small reused buffer (it stays in the CPU
        cache: an upper bound) or into a shard-sized buffer (what iter_shards yields)."""

        def run() -> float:
            arr = np.load(reference, mmap_mode="r")
            small = np.empty((per_read, *arr.shape[1:]), arr.dtype)
            t0 = time.perf_counter()
            for start in range(0, len(arr), per_shard):
                stop = min(len(arr), start + per_shard)
                for a in range(start, stop, per_read):
                    b = min(stop, a + per_read)
                    np.copyto(shard_buf[a - start : b - start] if into_shard else small[: b - a], arr[a:b])
            return time.perf_counter() - t0

        return run

    def memmap_batches() -> float:
        """Training-like: shuffled within shards, ``batch_size`` images gathered into a new array per batch."""
        arr = np.load(reference, mmap_mode="r")
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for start in range(0, len(arr), per_shard):
            order = start + rng.permutation(min(per_shard, len(arr) - start))
            for i in range(0, len(order), args.batch_size):
                torch.from_numpy(arr[np.sort(order[i : i + args.batch_size])])
        return time.perf_counter() - t0

    def shards(seed: int | None) -> Callable[[], float]:
        def run() -> float:
            opened = FeatureStore.open(big.path)
            t0 = time.perf_counter()
            for _ in opened.iter_shards(shuffle_seed=seed, images_per_read=per_read):
                pass
            return time.perf_counter() - t0

        return run

    def feature_batches() -> float:
        reader = FeatureBatches(big, np.arange(big.n_images), args.batch_size, torch.device("cpu"), in_memory=False)
        t0 = time.perf_counter()
        for _ in reader.epoch(torch.Generator().manual_seed(0)):
            pass
        return time.perf_counter() - t0

    methods = {  # name -> (reader, the memmap reference it is compared with)
        "memmap -> 8-image buffer": (memmap(False), "memmap -> 8-image buffer"),
        "memmap -> shard buffer": (memmap(True), "memmap -> shard buffer"),
        "memmap shuffled batches": (memmap_batches, "memmap shuffled batches"),
        "iter_shards in order": (shards(None), "memmap -> shard buffer"),
        "iter_shards shuffled": (shards(0), "memmap -> shard buffer"),
        "FeatureBatches stream": (feature_batches, "memmap shuffled batches"),
        "prototype: direct shard reads": (direct_reads(big, shard_buf, per_read), "memmap -> shard buffer"),
    }
    print(f"streaming {big.n_images} images ({nbytes / MB:.0f} MB, {per_shard} per shard, {big.n_shards} shards)")
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.stream_repeats):
        for name, (run, _) in methods.items():
            times[name].append(run())
    strict = times["memmap -> 8-image buffer"]
    rows = []
    for name, (_, ref) in methods.items():  # ratios paired per round, then the median
        ts = times[name]
        t = statistics.median(ts)
        vs_strict = statistics.median(a / b for a, b in zip(strict, ts, strict=True))
        vs_ref = statistics.median(a / b for a, b in zip(times[ref], ts, strict=True))
        rows.append((name, f"{nbytes / MB / t:.0f}", f"{big.n_images / t:.0f}", f"{vs_strict:.2f}", f"{vs_ref:.2f} ({ref})"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dinov2_vits14", help="registry name (random init)")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--images", type=int, default=48, help="toy training images (the issue asks for a few hundred: 200)")
    parser.add_argument(
        "--labels", default="gt,scribble",
        help="comma list of toy label sets (dense gt, sparse scribble, ...); NAME:N trains a dense set on N pixels per image",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size (TrainConfig default)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for extract and the online loader")
    parser.add_argument("--images-per-shard", type=int, default=16, help="shard size of the extracted cache")
    parser.add_argument("--online-batches", type=int, default=1, help="online batches measured per round")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the epoch comparison")
    parser.add_argument("--stream-images", type=int, default=1024, help="images in the streaming test store")
    parser.add_argument("--stream-repeats", type=int, default=5, help="interleaved rounds of the streaming test")
    parser.add_argument("--quiet", type=float, default=0.1, help="a round is quiet when others used less CPU than this")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--dir", default=None, help="folder for temporary files (default: system temp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_train_", dir=args.dir))
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}, {args.model} (random init) at {args.size}, files under {root}"
    )
    try:
        toy = make_toy(root / "toy", n_train=args.images, n_val=1)
        ws = Workspace.load(toy.workspace)
        items = find_images(ws.data_root, split="train")
        backbone = build_backbone(args.model, None, seed=0)
        cfg = ExtractConfig(
            model=args.model, size=args.size, random_init=True, workers=args.workers, device="cpu",
            images_per_shard=args.images_per_shard,
        )  # fmt: skip
        t0 = time.perf_counter()
        summary = extract(items, root / "cache" / "train.zarr", cfg, backbone=backbone)
        print(f"extract: {len(items)} images in {time.perf_counter() - t0:.1f} s ({summary.images_per_s:.2f} img/s in the loop)")
        store = FeatureStore.open(root / "cache" / "train.zarr")
        epochs = bench_epochs(store, ws, items, backbone, root, args)
        streams = bench_stream(store, root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\none epoch of {len(items)} images, batch {args.batch_size}, medians of {args.repeats} interleaved rounds")
    header = ("labels", "method", "epoch s", "quiet s", "img/s", "whole call s", "speed-up", "whole", "quiet", "others' CPU")
    print_table(header, epochs)
    print(f"\nstreaming one epoch from the page cache, medians of {args.stream_repeats} interleaved rounds")
    print_table(("reader", "MB/s", "img/s", "vs memmap 8-image", "vs matching memmap"), streams)


if __name__ == "__main__":
    main()
