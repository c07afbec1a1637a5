"""The direct shard reader returns exactly what zarr returns, is really used, and steps aside for
anything that is not the documented layout."""

import numpy as np
import pytest
from test_store import create, make_data, write

from pipeline.cache.shardread import ShardReader
from pipeline.cache.store import FeatureStore


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


def test_iter_shards_uses_the_direct_path(store, monkeypatch):
    s, (tokens, *_) = store
    monkeypatch.setattr(s, "read_tokens", lambda *a, **k: pytest.fail("zarr path used"))
    seen = 0
    for idx, block in s.iter_shards(shuffle_seed=1):
        np.testing.assert_array_equal(block, tokens[idx])
        seen += len(idx)
    assert seen == s.n_images


def test_damaged_index_falls_back_to_zarr(store):
    s, (tokens, *_) = store
    path = s._direct.shard_file(0)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # inside the index: the checksum no longer matches
    path.write_bytes(bytes(raw))
    start, stop = s.shard_range(0)
    out = np.empty((stop - start, *tokens.shape[1:]), np.float16)
    assert not s._direct.read(0, stop - start, out)
    assert not s._direct.read(999, 1, out[:1])  # no such shard file


def test_other_codec_chains_are_not_read_directly(tmp_path):
    compressed = [
        {
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": [1, 1, 2, 2, 4],
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "index_location": "end",
            },
        }
    ]
    assert ShardReader.for_array(tmp_path, compressed, 4, 1, 5, 32) is None
    assert ShardReader.for_array(tmp_path, [{"name": "bytes"}], 4, 1, 5, 32) is None
    compressed[0]["configuration"]["codecs"] = compressed[0]["configuration"]["codecs"][:1]
    assert ShardReader.for_array(tmp_path, compressed, 4, 1, 5, 32) is not None


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
