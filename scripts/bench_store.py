"""Benchmark the feature store: size on disk, write speed and sequential read speed per shard size.

Writes stores of synthetic float16 tokens with several shard sizes, then reads each whole store with
``iter_shards`` (in order and shuffled) and compares with a plain numpy memmap of the same bytes read
the same way (a few images per call into a reused buffer): the physical reference. Reads come from
the page cache (the files were just written). Run by hand; the numbers go into cache_layout.md::

    .venv/bin/python scripts/bench_store.py                       # ~1 minute on 2 cores
    .venv/bin/python scripts/bench_store.py --cases 37x37x1024 --images 512 --shard-mb 64,128
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from benchlib import print_table

from pipeline.cache.geometry import PATCH
from pipeline.cache.store import FeatureStore

MB = 2**20


def parse_case(text: str) -> tuple[int, int, int]:
    h, w, c = (int(x) for x in text.lower().split("x"))
    return h, w, c


def synthetic(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """(n, *shape) float16: 16 random images tiled (content does not matter without compression)."""
    pool = np.random.default_rng(seed).standard_normal((16, *shape)).astype(np.float16)
    return pool[np.arange(n) % 16]


def write_store(path: Path, tokens: np.ndarray, per_shard: int) -> float:
    """Create and fill a store; return seconds including the final sync to disk."""
    n, v, h, w, c = tokens.shape
    attrs = {"backbone": "synthetic", "layers": [-1], "size": h * PATCH, "weights_sha256": "0" * 64}
    t0 = time.perf_counter()
    store = FeatureStore.create(
        path,
        ids=[f"img{i:06d}" for i in range(n)],
        views=[f"view{k}" for k in range(v)],
        grid=(h, w),
        channels=c,
        attrs=attrs,
        images_per_shard=per_shard,
    )
    for k in range(store.n_shards):
        a, b = store.shard_range(k)
        cls = np.zeros((b - a, v, c), np.float16)
        geometry = np.zeros((b - a, 6), np.int32)
        store.write_shard(k, tokens[a:b], cls, geometry, np.ones(b - a, np.uint8))
    os.sync()
    return time.perf_counter() - t0


def read_store(path: Path, seed: int | None, images_per_read: int) -> float:
    store = FeatureStore.open(path)
    t0 = time.perf_counter()
    checksum = 0.0
    for _, tokens in store.iter_shards(shuffle_seed=seed, images_per_read=images_per_read):
        checksum += float(tokens[-1, 0, 0, 0, 0])  # touch the data
    return time.perf_counter() - t0


def read_memmap(path: Path, images_per_read: int) -> float:
    """Sequential read of a .npy memmap, ``images_per_read`` images per copy into a reused buffer."""
    arr = np.load(path, mmap_mode="r")
    buf = np.empty((images_per_read, *arr.shape[1:]), arr.dtype)
    t0 = time.perf_counter()
    for a in range(0, arr.shape[0], images_per_read):
        b = min(arr.shape[0], a + images_per_read)
        np.copyto(buf[: b - a], arr[a:b])
    return time.perf_counter() - t0


def read_calls(path: Path, images_per_read: int) -> float:
    """Sequential ``read_tokens`` calls of ``images_per_read`` images into one reused buffer."""
    store = FeatureStore.open(path)
    out = np.empty((images_per_read, store.n_views, *store.grid, store.channels), np.float16)
    t0 = time.perf_counter()
    for a in range(0, store.n_images - images_per_read + 1, images_per_read):
        store.read_tokens(a, a + images_per_read, out=out)
    return time.perf_counter() - t0


def median_time(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def bench_case(root: Path, case: str, args: argparse.Namespace) -> tuple[list[tuple], list[tuple]]:
    """One token grid: a store per shard size (table rows) and read_tokens call sizes (second table)."""
    h, w, c = parse_case(case)
    tokens = synthetic(args.images, (args.views, h, w, c))
    per_image, raw = tokens[0].nbytes, tokens.nbytes
    reference = root / "reference.npy"
    np.save(reference, tokens)
    memmap_s = median_time(lambda: read_memmap(reference, args.images_per_read), args.repeats)
    reference.unlink()
    targets = [int(x) for x in args.shard_mb.split(",")]
    rows, calls = [], []
    for target in targets:
        per_shard = min(args.images, max(1, round(target * MB / per_image)))
        path = root / f"{case}-{target}.zarr"
        write_s = write_store(path, tokens, per_shard)
        store = FeatureStore.open(path)
        if not np.array_equal(store.read_tokens(0, 2), tokens[:2]):
            raise RuntimeError("the store does not read back what was written")
        read_s = median_time(lambda p=path: read_store(p, None, args.images_per_read), args.repeats)
        shuf_s = median_time(lambda p=path: read_store(p, 0, args.images_per_read), args.repeats)
        disk = store.nbytes_on_disk()
        rows.append((case, f"{per_image / MB:.2f}", f"{per_shard * per_image / MB:.0f}", per_shard,
                     store.n_shards, f"{raw / MB:.0f}", f"{disk / MB:.1f}", f"{disk / raw - 1:+.3%}",
                     f"{raw / MB / write_s:.0f}", f"{raw / MB / read_s:.0f}", f"{raw / MB / shuf_s:.0f}",
                     f"{raw / MB / memmap_s:.0f}", f"{read_s / memmap_s:.1f}x"))  # fmt: skip
        if target == max(targets):
            for k in (int(x) for x in args.call_sizes.split(",") if int(x) <= args.images):
                seconds = median_time(lambda p=path, k=k: read_calls(p, k), args.repeats)
                used = (args.images // k) * k * per_image
                calls.append((case, k, f"{k * per_image / MB:.1f}", f"{used / MB / seconds:.0f}"))
        shutil.rmtree(path)
    return rows, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images per store")
    parser.add_argument("--cases", default="32x32x384,32x32x1024", help="comma list of HxWxC token grids")
    parser.add_argument("--views", type=int, default=1, help="views per image (2 = original + hflip)")
    parser.add_argument("--shard-mb", default="16,64,128,256", help="comma list of target shard sizes in MiB")
    parser.add_argument("--images-per-read", type=int, default=8, help="images per call in iter_shards")
    parser.add_argument("--call-sizes", default="1,4,8,16,32,64", help="images per read_tokens call to time")
    parser.add_argument("--repeats", type=int, default=3, help="reads per measurement (median)")
    parser.add_argument("--dir", default=None, help="folder for the temporary stores (default: system temp)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.dir))
    print(f"zarr {zarr.__version__}, numpy {np.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}, stores under {root}")  # fmt: skip
    rows: list[tuple] = []
    calls: list[tuple] = []
    try:
        for case in args.cases.split(","):
            case_rows, case_calls = bench_case(root, case, args)
            rows += case_rows
            calls += case_calls
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(("case", "MB/img", "shard MB", "img/shard", "shards", "raw MB", "disk MB", "overhead",
                 "write MB/s", "read MB/s", "shuffled", "memmap MB/s", "slower"), rows)  # fmt: skip
    print("\nread_tokens into a reused buffer, by images per call (largest shard size):")
    print_table(("case", "images/call", "MB/call", "read MB/s"), calls)


if __name__ == "__main__":
    main()
