"""Stores and label sets on object storage, against a real S3-compatible server on 127.0.0.1.

The server is moto's server mode (``python -m moto.server``), started once per session as a subprocess;
the client libraries (s3fs, botocore) talk HTTP to it exactly as to AWS or a lab MinIO. Each test has
its own bucket. The tests are skipped, with the reason, only when the server or the ``s3`` extra
cannot be imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

pytest.importorskip("moto.server", reason="moto's server mode is not installed: pip install 'moto[server]'")
s3fs = pytest.importorskip("s3fs", reason="the s3 extra is not installed: pip install 'ssvt[s3]'")
pytest.importorskip("upath", reason="the s3 extra is not installed: pip install 'ssvt[s3]'")

from pipeline.cache.labels import LabelSet, ensure_labels, update_label_attrs  # noqa: E402
from pipeline.cache.names import CacheLayout, label_set_path, location  # noqa: E402
from pipeline.cache.remote import RemoteShardReader  # noqa: E402
from pipeline.cache.store import FeatureStore  # noqa: E402
from pipeline.cli import app  # noqa: E402
from pipeline.errors import ConfigError, StoreError  # noqa: E402
from pipeline.workspace import Workspace  # noqa: E402

# Distinctive dummy credentials, so that the tests can look for them in everything written.
KEY_ID, SECRET = "AKIASSVTTESTKEY00001", "ssvt-test-secret-never-written-3f9c"
TINY = ["--model", "vit_tiny_test", "--random-init", "--size", "56", "--workers", "0"]
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free port of 127.0.0.1, and the AWS environment pointing at it (for this
    process and its subprocesses); the server is killed at the end of the session."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the moto server did not start on {endpoint} (exit code {server.poll()})")
                time.sleep(0.2)
        env = {
            "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }  # fmt: skip
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            yield endpoint
    finally:
        server.kill()
        server.wait()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A new, empty bucket of this test's own: its name."""
    name = f"ssvt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return name


def _fill(store: FeatureStore, seed: int = 0) -> np.ndarray:
    """Write every shard with random tokens; return them, (N, V, h, w, C) float16."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((store.n_images, store.n_views, *store.grid, store.channels)).astype(np.float16)
    for shard in store.missing_shards():
        a, b = store.shard_range(shard)
        n = b - a
        geometry = np.tile(np.array([56, 56, 56, 56, 0, 0], np.int32), (n, 1))
        cls = tokens[a:b, :, 0, 0]
        store.write_shard(shard, tokens[a:b], np.ascontiguousarray(cls), geometry, np.ones(n, np.uint8))
    return tokens


def _create(path: str | Path, n: int = 10) -> FeatureStore:
    ids = [f"im{i:03d}" for i in range(n)]
    attrs = {"backbone": "vit_tiny_test", "layers": [1], "size": 56, "weights_sha256": "0" * 64}
    return FeatureStore.create(
        path, ids=ids, views=["original", "hflip"], grid=(4, 4), channels=8, attrs=attrs, images_per_shard=4
    )


def test_urls_are_locations_and_credentials_in_them_are_refused(tmp_path: Path) -> None:
    assert location(f"file://{tmp_path}/s.zarr") == tmp_path / "s.zarr"
    assert str(location("s3://bucket/cache/m/train.zarr").parent) == "s3://bucket/cache/m"
    assert str(label_set_path("s3://bucket/c/train.zarr", "eps")) == "s3://bucket/c/train.labels.eps.h5"
    with pytest.raises(ConfigError, match="credentials in a URL are refused"):
        location(f"s3://{KEY_ID}:{SECRET}@bucket/cache")
    with pytest.raises(ConfigError, match="must be a local folder"):
        CacheLayout("s3://bucket/cache", "s3://bucket/runs")
    if importlib.util.find_spec("gcsfs") is None:  # another protocol's package missing: said in one line
        with pytest.raises(ConfigError, match="gcsfs"):
            location("gs://bucket/cache")
    toml = tmp_path / "ssvt.toml"
    toml.write_text('[dataset]\nroot = "data"\nformat = "list"\n[paths]\ncache = "s3://bucket/cache"\n')
    assert str(Workspace.load(toml).layout.store_path("m", "train")) == "s3://bucket/cache/m/train.zarr"
    toml.write_text('[dataset]\nroot = "data"\nformat = "list"\n[paths]\nruns = "s3://bucket/runs"\n')
    with pytest.raises(ConfigError, match=r"\[paths\] runs must be a local folder"):
        Workspace.load(toml)


def test_store_on_s3_reads_like_the_local_store(bucket: str, tmp_path: Path) -> None:
    local, url = _create(tmp_path / "train.zarr"), f"s3://{bucket}/cache/m/train.zarr"
    remote = _create(url)
    tokens = _fill(local)
    assert np.array_equal(_fill(remote), tokens)
    fs = s3fs.S3FileSystem()
    for key in ("tokens/zarr.json", "tokens/c/0/0/0/0/0", "image/c/0", "shard_done/c/2"):  # the same bytes as on disk
        assert fs.cat_file(f"{bucket}/cache/m/train.zarr/{key}") == (tmp_path / "train.zarr" / key).read_bytes(), key
    opened = FeatureStore.open(url)
    assert opened.is_complete()
    seen = np.zeros(opened.n_images, bool)
    for indices, block in opened.iter_shards(shuffle_seed=3):  # ranged GETs with the next shard prefetched
        assert np.array_equal(block, tokens[indices])
        assert opened._direct is not None
        assert opened._direct.last_path == "direct"
        seen[indices] = True
    assert seen.all()
    assert np.array_equal(opened.read_tokens(2, 7, view=1), tokens[2:7, 1])  # across shards, ranged GETs of the chunks
    assert opened._direct.last_path == "direct"
    assert np.array_equal(opened.read_tokens(0, 10), tokens)
    assert np.array_equal(opened.read_tokens(9, 10, view=0), tokens[9:10, 0])
    assert np.array_equal(opened.read_cls(), local.read_cls())
    info = opened.info()
    assert info["complete"]
    assert info["bytes_on_disk"] > local.raw_token_bytes()
    assert info["fingerprint"] == local.fingerprint()


def test_a_shard_is_fetched_as_ranges_in_flight_together(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One shard read is one batch of ranged GETs (s3fs runs a cat_ranges batch concurrently), each at
    most part_bytes long, covering the chunks and the index: not one request per chunk in turn."""
    url = f"s3://{bucket}/cache/m/train.zarr"
    tokens = _fill(_create(url))
    store = FeatureStore.open(url)
    reader = store._direct
    assert isinstance(reader, RemoteShardReader)
    reader.part_bytes = 2 * reader.chunk_bytes  # several ranges for this small shard
    calls: list[tuple[list[int], list[int]]] = []
    fs = store.path.fs
    real = fs.cat_ranges

    def recorded(paths: list[str], starts: list[int], ends: list[int], **kw: object) -> list[bytes]:
        calls.append((list(starts), list(ends)))
        return real(paths, starts, ends, **kw)

    monkeypatch.setattr(fs, "cat_ranges", recorded)
    out = np.empty((4, *tokens.shape[1:]), np.float16)
    assert reader.read(0, 4, out)
    assert reader.last_path == "direct"
    np.testing.assert_array_equal(out, tokens[:4])
    assert len(calls) == 1  # the shard's data and index in one round
    starts, ends = calls[0]
    assert len(starts) > 1
    index_bytes = store.images_per_shard * store.n_views * 16 + 4  # (offset, length) per chunk + crc32c
    assert all(e - s <= reader.part_bytes for s, e in zip(starts[:-1], ends[:-1], strict=True))
    assert ends[-1] - starts[-1] <= reader.part_bytes + index_bytes  # the last range also brings the index
    assert starts[0] == 0  # one contiguous cover of the chunks and the index after them
    assert all(a == b for a, b in zip(ends[:-1], starts[1:], strict=False))
    assert ends[-1] == 4 * store.n_views * reader.chunk_bytes + index_bytes


def test_shard_laid_out_otherwise_is_read_through_its_index(bucket: str) -> None:
    """A valid shard whose chunks do not start at byte 0: the index fetched with the data fails its
    checksum, so the reader fetches the index first and the chunks where it says they are."""
    import google_crc32c

    url = f"s3://{bucket}/s.zarr"
    tokens = _fill(_create(url))
    fs, key = s3fs.S3FileSystem(), f"{bucket}/s.zarr/tokens/c/0/0/0/0/0"
    blob = fs.cat_file(key)
    entries = 4 * 2  # images per shard x views
    data, index = blob[: -(entries * 16 + 4)], np.frombuffer(blob[-(entries * 16 + 4) : -4], "<u8").reshape(entries, 2).copy()
    pad = b"\0" * 100
    index[:, 0] += len(pad)
    fs.pipe_file(key, pad + data + index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(4, "little"))
    assert np.array_equal(zarr.open_group(url, mode="r")["tokens"][0:4], tokens[:4])  # zarr agrees the shard is valid
    opened = FeatureStore.open(url)
    assert np.array_equal(opened.read_tokens(1, 3), tokens[1:3])
    assert opened._direct is not None
    assert opened._direct.last_path == "direct"
    for indices, block in opened.iter_shards():
        assert np.array_equal(block, tokens[indices])
        assert opened._direct is not None
        assert opened._direct.last_path == "direct"


def test_damaged_shard_on_s3_falls_back_to_zarr(bucket: str) -> None:
    url = f"s3://{bucket}/s.zarr"
    store = _create(url)
    _fill(store)
    fs = s3fs.S3FileSystem()
    key = f"{bucket}/s.zarr/tokens/c/1/0/0/0/0"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF  # breaks the index checksum: the direct read refuses it, and so does zarr
    fs.pipe_file(key, bytes(data))
    opened = FeatureStore.open(url)
    with pytest.raises(ValueError, match=r"(?i)checksum|crc"):  # zarr's own error, as on local disk
        list(opened.iter_shards())
    assert opened._direct is not None
    assert opened._direct.last_reason == "shard index checksum mismatch"


def test_create_exists_and_remove_on_s3(bucket: str) -> None:
    url = f"s3://{bucket}/cache/m/train.zarr"
    assert not FeatureStore.exists(url)
    _create(url)
    assert FeatureStore.exists(url)
    with pytest.raises(StoreError, match="already exists"):
        _create(url)
    fs = s3fs.S3FileSystem()
    fs.rm(f"{bucket}/cache/m/train.zarr/zarr.json")  # what a creation killed before its last upload leaves
    assert not FeatureStore.exists(url)
    assert _create(url).n_images == 10  # the leftover is replaced
    FeatureStore.remove(url)
    assert not FeatureStore.exists(url)
    assert not fs.find(f"{bucket}/cache/m/train.zarr")
    fs.pipe_file(f"{bucket}/cache/other/notes.txt", b"keep me")
    with pytest.raises(StoreError, match="refusing to delete"):
        FeatureStore.remove(f"s3://{bucket}/cache/other")
    with pytest.raises(StoreError, match="other objects"):
        _create(f"s3://{bucket}/cache/other")
    assert fs.cat_file(f"{bucket}/cache/other/notes.txt") == b"keep me"


def test_creators_racing_on_s3_keep_each_others_shards(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of a job array may all create the store: a late creator rewrites the same metadata and
    deletes nothing another one wrote; shard objects without a group zarr.json (a killed removal) go."""
    url = f"s3://{bucket}/cache/m/train.zarr"
    fs = s3fs.S3FileSystem()
    first = _create(url)
    fs.rm(f"{bucket}/cache/m/train.zarr/zarr.json")  # a second creator's view: metadata being uploaded
    second = _create(url)  # rewrites the same objects
    tokens = _fill(first)  # the first creator goes on writing its shards
    assert second.is_complete()
    np.testing.assert_array_equal(FeatureStore.open(url).read_tokens(0, 10), tokens)
    with pytest.raises(StoreError, match="already exists"):  # a third that arrives after the shards
        _create(url)
    real_exists, calls = FeatureStore.exists, []

    def stale_first_check(path: object) -> bool:  # a creator that checked just before the store appeared
        calls.append(path)
        return len(calls) > 1 and real_exists(path)  # type: ignore[arg-type]

    monkeypatch.setattr(FeatureStore, "exists", staticmethod(stale_first_check))
    with pytest.raises(StoreError, match="already exists"):
        _create(url)
    monkeypatch.undo()
    np.testing.assert_array_equal(FeatureStore.open(url).read_tokens(0, 10), tokens)  # nothing deleted
    fs.rm(f"{bucket}/cache/m/train.zarr/zarr.json")  # a removal killed after its first delete
    fresh = _create(url)
    assert fresh.missing_shards() == [0, 1, 2]
    assert not [k for k in fs.find(f"{bucket}/cache/m/train.zarr") if "/tokens/c/" in k]
    assert not FeatureStore.open(url).read_tokens(0, 10).any()


def test_label_set_beside_a_store_on_s3(bucket: str, toy, tmp_path: Path) -> None:
    ws = Workspace.load(toy.workspace)
    local, url = tmp_path / "train.zarr", f"s3://{bucket}/cache/m/train.zarr"
    runner.invoke(app, ["extract", *TINY, "--config", str(toy.workspace), "--split", "train", "--out", str(local)])
    FeatureStore.open(local)  # extracted
    result = runner.invoke(app, ["extract", *TINY, "--config", str(toy.workspace), "--split", "train", "--out", url])
    assert result.exit_code == 0, result.output
    sets = [ensure_labels(ws.label_source("eps"), FeatureStore.open(p), num_classes=21) for p in (local, url)]
    assert str(sets[1].path) == f"s3://{bucket}/cache/m/train.labels.eps.h5"
    assert sets[0].fingerprint == sets[1].fingerprint
    indices = np.arange(5)
    assert np.array_equal(sets[0].masks(indices), sets[1].masks(indices))
    beside = [k for k in s3fs.S3FileSystem().find(f"{bucket}/cache/m") if "/train.zarr/" not in k]
    assert beside == [f"{bucket}/cache/m/train.labels.eps.h5"]  # one whole object, no temporary one
    assert [s["name"] for s in FeatureStore.open(url).label_sets()] == ["eps"]
    assert ensure_labels(ws.label_source("eps"), FeatureStore.open(url), num_classes=21).attrs == sets[1].attrs  # reused
    update_label_attrs(sets[1].path, quality='{"miou": 0.5}')
    assert LabelSet.open(sets[1].path).attrs["quality"] == {"miou": 0.5}


@pytest.mark.slow
def test_torchrun_ranks_extract_to_s3_as_one_local_process(bucket: str, toy, tmp_path: Path) -> None:
    """The README's multi-node command on one machine: 2 ranks write a store at an s3:// URL (rank 0
    creates it, the others open it) whose objects are the bytes one local process writes."""
    args = [*TINY, "--config", str(toy.workspace), "--split", "train", "--images-per-shard", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each rank: float sums in one order
    local, url = tmp_path / "train.zarr", f"s3://{bucket}/cache/m/train.zarr"
    one = subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", *args, "--out", str(local)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "pipeline.cli", "extract", *args, "--out", url], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert "extract train (2 processes)" in two.stdout  # one bar, rank 0's, of both ranks
    fs, root = s3fs.S3FileSystem(), f"{bucket}/cache/m/train.zarr"
    keys = sorted(k[len(root) + 1 :] for k in fs.find(root))
    assert keys == sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert len([k for k in keys if k.startswith("tokens/c/")]) == FeatureStore.open(local).n_shards
    for key in keys:
        remote_bytes, local_bytes = fs.cat_file(f"{root}/{key}"), (local / key).read_bytes()
        if key == "zarr.json":  # the group metadata: only `created` may differ
            remote_meta, local_meta = json.loads(remote_bytes), json.loads(local_bytes)
            remote_meta["attributes"].pop("created"), local_meta["attributes"].pop("created")
            assert remote_meta == local_meta
        else:
            assert remote_bytes == local_bytes, key


def test_missing_credentials_are_one_line_and_say_where_they_come_from(bucket: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    url = f"s3://{bucket}/cache/m/train.zarr"
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "info", url], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("error: object storage: NoCredentialsError"), result.stderr
    assert "AWS_ACCESS_KEY_ID" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) <= 3  # one line, wrapped by the terminal width at most


def _workspace(toy_root: Path, name: str, cache: str) -> Path:
    """A copy of the toy's ssvt.toml with its own cache and runs folder."""
    text = (toy_root / "ssvt.toml").read_text()
    text = text.replace('cache = "cache"', f'cache = "{cache}"').replace('runs = "runs"', f'runs = "runs-{name}"')
    assert f'cache = "{cache}"' in text
    path = toy_root / f"{name}.toml"
    path.write_text(text)
    return path


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_extract_to_s3_killed_and_resumed_then_train_and_evaluate_as_locally(bucket: str, toy_copy: Path) -> None:
    local_ws = _workspace(toy_copy, "local", "cache")
    remote_ws = _workspace(toy_copy, "remote", f"s3://{bucket}/cache")
    train_url = f"s3://{bucket}/cache/vit_tiny_test-56-last-random/train.zarr"
    extract = [*TINY, "--batch-size", "1", "--images-per-shard", "1"]

    # Kill an extraction to s3:// (SIGKILL, no clean-up) once a shard is flagged done, then resume it.
    cmd = [sys.executable, "-m", "pipeline.cli", "extract", *extract, "--config", str(remote_ws), "--split", "train"]
    log = toy_copy / "extract.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*cmd, "--out", train_url], stdout=out, stderr=subprocess.STDOUT, cwd=toy_copy)
    fs, done_key = s3fs.S3FileSystem(), f"{train_url[5:]}/shard_done/c"
    deadline = time.monotonic() + 300
    while not fs.exists(done_key) or not fs.ls(done_key, refresh=True):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no shard was flagged done in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = FeatureStore.open(train_url)
    assert 0 < killed.done_shards().sum() < killed.n_shards, "the extraction finished before it was killed"
    _ok(["extract", *extract, "--config", str(remote_ws), "--split", "train", "--out", train_url])
    _ok(["extract", *extract, "--config", str(remote_ws), "--split", "val"])
    _ok(["extract", *extract, "--config", str(local_ws)])

    layouts = {name: Workspace.load(ws).layout for name, ws in (("local", local_ws), ("remote", remote_ws))}
    for split in ("train", "val"):
        local, remote = (FeatureStore.open(layouts[k].find_store(split)) for k in ("local", "remote"))
        assert str(remote.path).startswith("s3://")
        assert remote.is_complete()
        assert np.array_equal(local.read_tokens(0, local.n_images), remote.read_tokens(0, remote.n_images))
        assert np.array_equal(local.read_cls(), remote.read_cls())
        assert np.array_equal(local.geometry(), remote.geometry())
        assert np.array_equal(local.status(), remote.status())

    # train-head and evaluate from the remote store give the local store's results.
    metrics = {}
    for name, ws in (("local", local_ws), ("remote", remote_ws)):
        _ok(["train-head", "--config", str(ws), "--labels", "eps", "--epochs", "5", "--min-steps", "10", "--lr", "0.01"])
        run = toy_copy / f"runs-{name}" / "eps-bn-linear"
        trained = json.loads((run / "metrics.json").read_text())
        _ok(["evaluate", "--config", str(ws), str(run)])
        metrics[name] = (trained, json.loads((run / "metrics.json").read_text()))
    for local_m, remote_m in zip(metrics["local"], metrics["remote"], strict=True):
        assert remote_m["miou"] == pytest.approx(local_m["miou"], abs=1e-9)
        assert remote_m.get("iou") == pytest.approx(local_m.get("iou"), abs=1e-9, nan_ok=True)
    config = json.loads((toy_copy / "runs-remote" / "eps-bn-linear" / "config.json").read_text())
    assert config["store"]["path"] == train_url

    out = _ok(["info", train_url])
    assert "vit_tiny_test" in out
    assert "eps" in out
    assert "yes" in out

    # The credentials are never written: not into the store, its label sets, or the run folder.
    fs.invalidate_cache()  # this test's own listings above are stale
    written = [fs.cat_file(key) for key in fs.find(bucket)]
    written += [p.read_bytes() for p in (toy_copy / "runs-remote").rglob("*") if p.is_file()]
    assert written
    for blob in written:
        assert KEY_ID.encode() not in blob
        assert SECRET.encode() not in blob
