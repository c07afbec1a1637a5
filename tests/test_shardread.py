"""The direct shard reader returns exactly what zarr returns, is really used, and steps aside for
anything that is not the documented layout, saying why."""

import copy
import json
import logging

import numpy as np
import pytest
import zarr
from test_store import GRID, VIEWS, C, S, create, make_data, write

from pipeline.cache.shardread import ShardReader
from pipeline.cache.store import FeatureStore

CHUNK_BYTES = GRID[0] * GRID[1] * C * 2


def read_paths(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ``read_path`` ("direct" or "zarr") of every log record of the shard reader, in order."""
    return [r.read_path for r in caplog.records if r.name == "pipeline.cache.shardread" and hasattr(r, "read_path")]


@pytest.fixture
def store(tmp_path):
    data = make_data()
    s = create(tmp_path / "train.zarr")
    write(s, data)
    return FeatureStore.open(tmp_path / "train.zarr"), data


def test_direct_reads_equal_zarr_reads(store):
    s, (tokens, *_) = store
    assert s._direct is not None
    for k in range(s.n_shards):
        start, stop = s.shard_range(k)
        out = np.full((stop - start, *tokens.shape[1:]), np.nan, np.float16)
        assert s._direct.read(k, stop - start, out, per_read=3)
        np.testing.assert_array_equal(out, tokens[start:stop])
        np.testing.assert_array_equal(out, s.read_tokens(start, stop))


def test_a_store_written_by_ssvt_is_read_directly(tmp_path, monkeypatch, caplog):
    """Fails when the fast path silently stops being used, e.g. a zarr release that writes another layout."""
    tokens, *_ = data = make_data()
    write(create(tmp_path / "train.zarr"), data)
    caplog.set_level(logging.DEBUG, logger="pipeline.cache.shardread")
    s = FeatureStore.open(tmp_path / "train.zarr")
    assert read_paths(caplog) == []  # no "not the documented layout" warning at open
    monkeypatch.setattr(s, "read_tokens", lambda *a, **k: pytest.fail("zarr path used"))
    seen = 0
    for idx, block in s.iter_shards(shuffle_seed=1):
        np.testing.assert_array_equal(block, tokens[idx])
        seen += len(idx)
    assert seen == s.n_images
    assert read_paths(caplog) == ["direct"] * s.n_shards
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_damaged_index_falls_back_to_zarr(store):
    s, (tokens, *_) = store
    path = s._direct.shard_file(0)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # inside the index: the checksum no longer matches
    path.write_bytes(bytes(raw))
    start, stop = s.shard_range(0)
    out = np.empty((stop - start, *tokens.shape[1:]), np.float16)
    assert not s._direct.read(0, stop - start, out)
    assert (s._direct.last_path, s._direct.last_reason) == ("zarr", "shard index checksum mismatch")
    assert not s._direct.read(999, 1, out[:1])  # no such shard file
    assert s._direct.last_path == "zarr"
    assert s._direct.last_reason.startswith("no shard file")
    assert s._direct.read(1, stop - start, out)
    assert (s._direct.last_path, s._direct.last_reason) == ("direct", None)


def test_only_the_first_fallback_of_a_reader_warns(store, caplog):
    s, (tokens, *_) = store
    out = np.empty((1, *tokens.shape[1:]), np.float16)
    caplog.set_level(logging.DEBUG, logger="pipeline.cache.shardread")
    assert not s._direct.read(998, 1, out)
    assert not s._direct.read(999, 1, out)
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]
    assert read_paths(caplog) == ["zarr", "zarr"]


def _set(path: list, value):
    """A change to a zarr.json: set the item at ``path`` (keys and indices) to ``value``."""

    def change(meta: dict) -> None:
        *parents, last = path
        for key in parents:
            meta = meta[key]
        meta[last] = value

    return change


SHARDING = ["codecs", 0, "configuration"]
LITTLE = {"name": "bytes", "configuration": {"endian": "little"}}
OTHER_LAYOUTS = {  # a change to the tokens array's zarr.json -> the words the reason must contain
    "float32": (_set(["data_type"], "float32"), "data type"),
    "dot separator": (_set(["chunk_key_encoding", "configuration", "separator"], "."), "chunk key encoding"),
    "v2 keys": (_set(["chunk_key_encoding"], {"name": "v2", "configuration": {"separator": "."}}), "chunk key encoding"),
    "zstd": (_set([*SHARDING, "codecs"], [LITTLE, {"name": "zstd", "configuration": {"level": 0}}]), "chunk codecs"),
    "big-endian": (_set([*SHARDING, "codecs", 0, "configuration", "endian"], "big"), "chunk codecs"),
    "no index checksum": (_set([*SHARDING, "index_codecs"], [LITTLE]), "shard index codecs"),
    "index first": (_set([*SHARDING, "index_location"], "start"), "shard index location"),
    "image per chunk": (_set([*SHARDING, "chunk_shape"], [1, len(VIEWS), *GRID, C]), "chunk shape"),
    "other shards": (_set(["chunk_grid", "configuration", "chunk_shape", 0], S + 1), "shard shape"),
    "unsharded": (_set(["codecs"], [LITTLE]), "codecs"),
    "transformer": (_set(["storage_transformers"], [{"name": "x"}]), "storage transformers"),
}


@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
def test_other_layouts_are_not_read_directly(store, tmp_path, caplog, layout):
    s, _ = store
    meta = json.loads((s.path / "tokens" / "zarr.json").read_text())
    args = (S, len(VIEWS), 5, CHUNK_BYTES)
    assert ShardReader.layout_problem(s.path / "tokens", meta["codecs"], *args) is None
    change, words = OTHER_LAYOUTS[layout]
    other = copy.deepcopy(meta)
    change(other)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "zarr.json").write_text(json.dumps(other))
    problem = ShardReader.layout_problem(tmp_path / "other", other["codecs"], *args)
    assert problem is not None
    assert words in problem
    assert ShardReader.for_array(tmp_path / "other", other["codecs"], *args) is None
    assert read_paths(caplog) == ["zarr"]
    assert words in caplog.records[-1].getMessage()


REWRITTEN = {  # create_array arguments for a tokens array written by other tools -> words of the reason
    "zstd": ({"compressors": zarr.codecs.ZstdCodec(level=1)}, "chunk codecs"),
    "big-endian": ({"serializer": zarr.codecs.BytesCodec(endian="big")}, "chunk codecs"),
    "image per chunk": ({"chunks": (1, len(VIEWS), *GRID, C)}, "chunk shape"),
    "shards of 2": ({"shards": (2, len(VIEWS), *GRID, C)}, "shard shape"),
    "unsharded": ({"shards": None}, "codecs"),
    "dot separator": ({"chunk_key_encoding": {"name": "default", "separator": "."}}, "chunk key encoding"),
}


@pytest.mark.parametrize("layout", REWRITTEN)
def test_a_store_rewritten_in_another_layout_is_read_through_zarr(tmp_path, caplog, layout):
    tokens, *_ = data = make_data()
    write(create(tmp_path / "train.zarr"), data)
    kwargs, words = REWRITTEN[layout]
    kwargs = {"chunks": (1, 1, *GRID, C), "shards": (S, len(VIEWS), *GRID, C), "compressors": None, **kwargs}
    group = zarr.open_group(tmp_path / "train.zarr", mode="r+", zarr_format=3)
    group.create_array("tokens", shape=tokens.shape, dtype="float16", fill_value=0, overwrite=True, **kwargs)[:] = tokens
    caplog.set_level(logging.DEBUG, logger="pipeline.cache.shardread")
    s = FeatureStore.open(tmp_path / "train.zarr")
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.read_path == "zarr"
    assert words in warning.getMessage()
    seen = 0
    for idx, block in s.iter_shards(shuffle_seed=2, images_per_read=3):
        np.testing.assert_array_equal(block, tokens[idx])
        seen += len(idx)
    assert seen == s.n_images
    assert "direct" not in read_paths(caplog)


def test_zarrs_own_view_of_the_codecs_and_a_missing_zarr_json_are_reasons(store, tmp_path):
    s, _ = store
    meta = json.loads((s.path / "tokens" / "zarr.json").read_text())
    args = (S, len(VIEWS), 5, CHUNK_BYTES)
    compressed = copy.deepcopy(meta["codecs"])
    compressed[0]["configuration"]["codecs"].append({"name": "zstd", "configuration": {"level": 0}})
    assert ShardReader.layout_problem(s.path / "tokens", compressed, *args).startswith("zarr reports chunk codecs")
    assert "zarr.json cannot be read" in ShardReader.layout_problem(tmp_path, meta["codecs"], *args)
    (tmp_path / "zarr.json").write_text("{}")
    assert "zarr.json is not" in ShardReader.layout_problem(tmp_path, meta["codecs"], *args)


def test_scattered_reads_and_zarr_fallback_give_the_same_shuffled_epoch(store):
    s, (tokens, *_) = store
    start, stop = s.shard_range(1)
    rows = np.random.default_rng(0).permutation(stop - start)
    out = np.empty((stop - start, *tokens.shape[1:]), np.float16)
    assert s._direct.read(1, stop - start, out, per_read=2, rows=rows)
    np.testing.assert_array_equal(out[rows], tokens[start:stop])
    direct = [(i.copy(), t.copy()) for i, t in s.iter_shards(shuffle_seed=5)]
    s._direct = None  # as for a store written with another codec chain
    through_zarr = [(i.copy(), t.copy()) for i, t in s.iter_shards(shuffle_seed=5, images_per_read=3)]
    for (i1, t1), (i2, t2) in zip(direct, through_zarr, strict=True):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(t1, tokens[i1])
