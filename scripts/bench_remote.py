"""Benchmark a feature store on object storage against the same store on local disk.

Starts an S3-compatible server on 127.0.0.1 (moto's server mode, ``pip install 'moto[server]'``) unless
``--endpoint`` names one (a lab MinIO: then set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY yourself),
writes one store of synthetic float16 tokens both locally and to ``s3://<bucket>/bench.zarr`` with
``FeatureStore.write_shard``, and reads each whole store with ``iter_shards``: locally with the direct
reader (pread, page cache warm), remotely with the ranged-GET reader (shard index, then a few large
ranges in flight, next shard prefetched). Also ``read_tokens`` of 8 images a call (training's in-memory
load, evaluation), and two references: the remote store read through zarr alone (its FsspecStore, 8
images a call: what ssvt falls back to) and one plain GET per whole shard object (the transport's
ceiling). With a local server, client and server share the CPUs: the "machine CPU"
column says how busy the whole machine was. moto answers a ranged GET by reading the whole object and
slicing it, so on moto every extra range costs a full shard read on the server; ``--part-mb`` sets the
reader's range size (default: the reader's own, 16 MiB, sized for S3, where ranges in flight add
bandwidth). Usage::

    .venv/bin/python scripts/bench_remote.py                          # ~1 minute on 2 cores
    .venv/bin/python scripts/bench_remote.py --images 512 --grid 37x37x1024 --shard-mb 128 --part-mb 16,64,128
    .venv/bin/python scripts/bench_remote.py --endpoint http://minio.lab:9000 --bucket scratch
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import s3fs
import zarr
from benchlib import cpu_seconds, print_table

from pipeline.cache.geometry import PATCH
from pipeline.cache.remote import PART_BYTES, RemoteShardReader
from pipeline.cache.store import FeatureStore

MB = 2**20


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    """A moto S3 server on a free port of 127.0.0.1, with dummy credentials in the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        server.kill()
        raise RuntimeError(f"moto did not start on {endpoint}")
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    return server, endpoint


def write_store(path: str, tokens: np.ndarray, per_shard: int) -> float:
    """Create and fill a store (the extract path: one write_shard per shard); return seconds."""
    n, v, h, w, c = tokens.shape
    attrs = {"backbone": "synthetic", "layers": [-1], "size": h * PATCH, "weights_sha256": "0" * 64}
    t0 = time.perf_counter()
    store = FeatureStore.create(path, ids=[f"img{i:06d}" for i in range(n)], views=[f"view{k}" for k in range(v)],
                                grid=(h, w), channels=c, attrs=attrs, images_per_shard=per_shard)  # fmt: skip
    for k in range(store.n_shards):
        a, b = store.shard_range(k)
        store.write_shard(k, tokens[a:b], np.zeros((b - a, v, c), np.float16), np.zeros((b - a, 6), np.int32),
                          np.ones(b - a, np.uint8))  # fmt: skip
    return time.perf_counter() - t0


def iter_shards(store: FeatureStore, seed: int | None) -> None:
    for _, tokens in store.iter_shards(shuffle_seed=seed):
        float(tokens[-1, 0, 0, 0, 0])  # touch the data


def read_calls(store: FeatureStore, images_per_read: int = 8) -> None:
    """Sequential read_tokens calls of a few images into one reused buffer (training's in-memory load)."""
    out = np.empty((images_per_read, store.n_views, *store.grid, store.channels), np.float16)
    for a in range(0, store.n_images - images_per_read + 1, images_per_read):
        store.read_tokens(a, a + images_per_read, out=out)


def zarr_only(url: str, images_per_read: int = 8) -> None:
    """What ssvt falls back to: zarr alone (its FsspecStore), a few images per call, one reused buffer."""
    tokens = zarr.open_group(url, mode="r")["tokens"]
    for a in range(0, tokens.shape[0] - images_per_read + 1, images_per_read):
        tokens[a : a + images_per_read]


def whole_objects(fs: s3fs.S3FileSystem, root: str, n_shards: int) -> None:
    """One plain GET per tokens shard object: the transport's ceiling for this client and server."""
    for k in range(n_shards):
        fs.cat_file(f"{root}/tokens/c/{k}/0/0/0/0")


def measure(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """(median seconds, share of the machine's CPUs busy meanwhile)."""
    times, busy = [], []
    for _ in range(repeats):
        b0, _ = cpu_seconds()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        busy.append((cpu_seconds()[0] - b0) / dt / (os.cpu_count() or 1))
    return statistics.median(times), statistics.median(busy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192, help="images in the store")
    parser.add_argument("--grid", default="32x32x768", help="HxWxC token grid of one image view")
    parser.add_argument("--shard-mb", type=int, default=48, help="target shard size in MiB")
    parser.add_argument("--part-mb", default=f"{PART_BYTES // MB},48", help="comma list of ranged-GET sizes in MiB to time")
    parser.add_argument("--repeats", type=int, default=3, help="reads per measurement (median)")
    parser.add_argument("--endpoint", default=None, help="an S3 endpoint to use instead of starting moto")
    parser.add_argument("--bucket", default=None, help="an existing bucket (default: a new one)")
    args = parser.parse_args()

    server = None
    if args.endpoint is None:
        server, args.endpoint = start_server()
    os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    fs = s3fs.S3FileSystem()
    bucket = args.bucket or f"bench-{uuid.uuid4().hex[:8]}"
    if args.bucket is None:
        fs.mkdir(bucket)
    url, root = f"s3://{bucket}/bench-{uuid.uuid4().hex[:8]}.zarr", None
    local = Path(tempfile.mkdtemp(prefix="bench_remote_")) / "bench.zarr"
    try:
        h, w, c = (int(x) for x in args.grid.lower().split("x"))
        pool = np.random.default_rng(0).standard_normal((16, 1, h, w, c)).astype(np.float16)
        tokens = pool[np.arange(args.images) % 16]
        per_image, raw = tokens[0].nbytes, tokens.nbytes
        per_shard = min(args.images, max(1, round(args.shard_mb * MB / per_image)))
        print(f"zarr {zarr.__version__}, s3fs {s3fs.__version__}, Python {platform.python_version()}, "
              f"{os.cpu_count()} CPUs, server {args.endpoint}{' (moto, on this machine)' if server else ''}")  # fmt: skip
        print(f"store: {args.images} images of {args.grid} float16 ({per_image / MB:.2f} MB each), "
              f"{per_shard} per shard ({per_shard * per_image / MB:.0f} MB), {raw / MB:.0f} MB of tokens\n")  # fmt: skip
        write_local = write_store(str(local), tokens, per_shard)
        write_remote = write_store(url, tokens, per_shard)
        stores = {"local": FeatureStore.open(local), "remote": FeatureStore.open(url)}
        for name, store in stores.items():
            if not np.array_equal(store.read_tokens(0, 2), tokens[:2]):
                raise RuntimeError(f"the {name} store does not read back what was written")
        root = url[len("s3://") :]
        reader = stores["remote"]._direct  # the bench sets its range size; FeatureStore keeps the reader private
        if not isinstance(reader, RemoteShardReader):
            raise RuntimeError("the remote store did not get the ranged-GET reader")
        cases: list[tuple[str, Callable[[], None], float | None]] = [
            ("local disk, direct reader (pread)", lambda: iter_shards(stores["local"], None), write_local),
            ("local disk, direct reader, shuffled", lambda: iter_shards(stores["local"], 0), None),
        ]
        for i, part_mb in enumerate(int(x) for x in args.part_mb.split(",")):

            def ranged(seed: int | None, part: int = part_mb * MB) -> None:
                reader.part_bytes = max(reader.chunk_bytes, part // reader.chunk_bytes * reader.chunk_bytes)
                iter_shards(stores["remote"], seed)

            cases.append((f"S3, ranged GETs of {part_mb} MiB + prefetch", lambda f=ranged: f(None), None if i else write_remote))
            cases.append((f"S3, ranged GETs of {part_mb} MiB + prefetch, shuffled", lambda f=ranged: f(0), None))
        cases.append(("local disk, read_tokens x8", lambda: read_calls(stores["local"]), None))
        cases.append(("S3, read_tokens x8 (ranged GETs of those chunks)", lambda: read_calls(stores["remote"]), None))
        cases.append(("S3, zarr FsspecStore alone, 8 images a call", lambda: zarr_only(url), None))
        cases.append(("S3, one GET per whole shard (ceiling)", lambda: whole_objects(fs, root, stores["remote"].n_shards), None))
        rows = []
        for label, fn, write_s in cases:
            seconds, busy = measure(fn, args.repeats)
            rows.append((label, f"{raw / MB / seconds:.0f}", f"{busy:.0%}", f"{raw / MB / write_s:.0f}" if write_s else ""))
        print_table(("read path", "read MB/s", "machine CPU", "write MB/s"), rows)
    finally:
        shutil.rmtree(local.parent, ignore_errors=True)
        FeatureStore.remove(url)
        if server is not None:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
