"""StoreDataset and the shard-aligned samplers on a tiny store of the toy train split (16 images, 3 per
shard, two views, one image that fails to decode): items equal what FeatureStore and LabelSet read,
the order is a shard-aligned permutation, and worker processes give the same data as the main one."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.cache.labels import LabelSet, ensure_labels
from pipeline.cache.names import ImageStatus
from pipeline.cache.store import FeatureStore
from pipeline.cache.voc import NUM_CLASSES
from pipeline.config import ExtractConfig
from pipeline.errors import ConfigError, StoreMismatchError
from pipeline.features.data import find_images
from pipeline.features.extract import extract
from pipeline.training.dataset import ShardBatchSampler, ShardShuffleSampler, StoreDataset
from pipeline.workspace import Workspace

TINY = ExtractConfig(model="vit_tiny_test", random_init=True, size=56, workers=0, images_per_shard=3, flip=True)
BROKEN = 4


@pytest.fixture(scope="module")
def cache(toy, tmp_path_factory) -> tuple[FeatureStore, LabelSet, LabelSet]:
    """The store (image 4 a broken file, so status FAILED) and its gt and eps label sets."""
    tmp = tmp_path_factory.mktemp("dataset")
    items = find_images(toy.voc_root, "train")
    bad = tmp / "broken.jpg"
    bad.write_bytes(Path(items[0].path).read_bytes()[:200])
    items[BROKEN] = type(items[BROKEN])(items[BROKEN].id, bad)
    extract(items, tmp / "train.zarr", TINY)
    store = FeatureStore.open(tmp / "train.zarr")
    ws = Workspace.load(toy.workspace)
    gt, eps = (ensure_labels(ws.labels[n], store, num_classes=NUM_CLASSES) for n in ("gt", "eps"))
    return store, gt, eps


def test_items_are_the_store_tokens_and_label_masks(cache):
    store, gt, _ = cache
    assert store.status()[BROKEN] == ImageStatus.FAILED
    ds = StoreDataset(store.path, gt)
    expected = np.flatnonzero((store.status() == ImageStatus.OK) & gt.labelled)
    assert ds.indices.tolist() == expected.tolist()
    assert BROKEN not in ds.indices
    for p in [*range(len(ds)), 7, 0, len(ds) - 1, 3]:  # in order, then jumping between shards
        i = int(ds.indices[p])
        item = ds[p]
        assert set(item) == {"tokens", "view", "mask", "geometry", "id", "index"}
        assert item["tokens"].dtype == torch.float16
        assert item["tokens"].shape == (*store.grid, store.channels)
        np.testing.assert_array_equal(item["tokens"].numpy(), store.read_tokens(i, i + 1, view=0)[0])
        assert item["tokens"].abs().sum() > 0
        assert item["mask"].dtype == torch.uint8
        assert item["mask"].shape == (store.size, store.size)
        np.testing.assert_array_equal(item["mask"].numpy(), gt.masks(np.array([i]))[0])
        np.testing.assert_array_equal(item["geometry"].numpy(), store.geometry()[i])
        assert ds.geometry(p) == store.geometries()[i]
        assert (item["id"], item["index"], item["view"]) == (store.ids[i], i, 0)


def test_flipped_view_flips_the_mask_and_reads_without_cache_agree(cache):
    store, gt, _ = cache
    flipped = StoreDataset(store, gt, view=1, cache_shard=False)
    cached = StoreDataset(store, gt, view=1)
    for p in range(len(flipped)):
        i, item = int(flipped.indices[p]), flipped[p]
        np.testing.assert_array_equal(item["tokens"].numpy(), store.read_tokens(i, i + 1, view=1)[0])
        np.testing.assert_array_equal(item["mask"].numpy(), gt.masks(np.array([i]))[0][:, ::-1])
        other = cached[p]
        assert torch.equal(other["tokens"], item["tokens"])
        assert torch.equal(other["mask"], item["mask"])
    torch.manual_seed(0)
    random, by_view = StoreDataset(store, gt, view="random"), [StoreDataset(store, gt), flipped]
    views = set()
    for p in range(len(random)):
        item = random[p]
        views.add(item["view"])
        assert torch.equal(item["tokens"], by_view[item["view"]][p]["tokens"])
        assert torch.equal(item["mask"], by_view[item["view"]][p]["mask"])
    assert views == {0, 1}


def test_several_label_sets_give_masks_by_name(cache):
    store, gt, eps = cache
    ds = StoreDataset(store, [gt, eps])
    assert ds.indices.tolist() == np.flatnonzero((store.status() == 1) & gt.labelled & eps.labelled).tolist()
    item = ds[2]
    assert set(item["masks"]) == {"gt", "eps"}
    i = item["index"]
    np.testing.assert_array_equal(item["masks"]["eps"].numpy(), eps.masks(np.array([i]))[0])
    plain = StoreDataset(store)
    assert not {"mask", "masks"} & set(plain[0])
    assert BROKEN not in plain.indices
    assert len(StoreDataset(store, indices=[BROKEN, 0])) == 2


def test_bad_arguments_are_named(cache, tmp_path):
    store, gt, _ = cache
    with pytest.raises(ConfigError, match="view"):
        StoreDataset(store, gt, view=2)
    with pytest.raises(ConfigError, match="distinct"):
        StoreDataset(store, [gt, gt])
    with pytest.raises(ConfigError, match="indices"):
        StoreDataset(store, indices=[store.n_images])
    with pytest.raises(ConfigError, match="batch_size"):
        ShardBatchSampler(ShardShuffleSampler(StoreDataset(store)), 0)
    attrs = {"backbone": store.backbone, "layers": store.layers, "size": store.size}
    other = FeatureStore.create(tmp_path / "other.zarr", ids=["a", "b"], views=store.views, grid=store.grid,
                                channels=store.channels, attrs=attrs)  # fmt: skip
    with pytest.raises(StoreMismatchError, match="another store"):
        StoreDataset(other, gt)


def shard_runs(order: list[int], shards: np.ndarray) -> list[int]:
    """The shard of each run of consecutive positions that share a shard."""
    seq = shards[order]
    return [int(seq[0]), *(int(b) for a, b in itertools.pairwise(seq) if a != b)]


def test_sampler_is_a_shard_aligned_permutation_fixed_by_seed_and_epoch(cache):
    store, gt, _ = cache
    ds = StoreDataset(store, gt)
    sampler = ShardShuffleSampler(ds, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(len(ds)))
    assert len(sampler) == len(ds)
    runs = shard_runs(first, ds.shards)
    assert sorted(runs) == sorted(set(ds.shards.tolist()))  # each shard read in one run, until exhausted
    assert list(ShardShuffleSampler(ds, seed=3)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert sorted(second) == sorted(first)
    assert sorted(shard_runs(second, ds.shards)) == sorted(runs)
    assert list(ShardShuffleSampler(ds, seed=4)) != first
    assert list(ShardShuffleSampler(ds, seed=3, shuffle=False)) == list(range(len(ds)))


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_never_straddle_shards(cache, drop_last):
    store, _, _ = cache
    ds = StoreDataset(store)  # 15 OK images in shards of 3 (shard 1 holds the broken image)
    batches = ShardBatchSampler(ShardShuffleSampler(ds, seed=0), 2, drop_last=drop_last)
    batches.set_epoch(2)
    got = list(batches)
    assert len(got) == len(batches)
    assert all(len(set(ds.shards[b].tolist())) == 1 for b in got)
    order = ShardShuffleSampler(ds, seed=0)
    order.set_epoch(2)
    flat = [p for b in got for p in b]
    assert flat == [p for g in order.groups() for p in g[: len(g) - len(g) % 2 if drop_last else None].tolist()]
    assert len(flat) == (10 if drop_last else len(ds))  # shards of 3, 2, 3, 3, 3, 1 OK images


def gather(loader: DataLoader) -> dict[str, Any]:
    """Every batch of ``loader`` joined along B: tensors concatenated, ids listed, masks by name."""
    batches = list(loader)
    out: dict[str, Any] = {k: torch.cat([b[k] for b in batches]) for k in ("tokens", "index", "geometry", "view")}
    out["id"] = [i for b in batches for i in b["id"]]
    out.update({name: torch.cat([b["masks"][name] for b in batches]) for name in batches[0]["masks"]})
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert_same(value, b[key])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_give_the_same_data_as_the_main_process(cache, context):
    store, gt, eps = cache
    ds = StoreDataset(store, [gt, eps], view=1)
    ds[0]  # the store is open and a shard cached here: each worker must open its own
    assert_same(pickle.loads(pickle.dumps(ds))[3], ds[3])
    sampler = ShardShuffleSampler(ds, seed=1)
    sampler.set_epoch(1)
    main = gather(DataLoader(ds, batch_size=4, sampler=sampler))
    assert main["index"].tolist() == ds.indices[list(sampler)].tolist()
    batches = ShardBatchSampler(sampler, 4)
    assert_same(gather(DataLoader(ds, batch_sampler=batches, num_workers=2, multiprocessing_context=context)), main)
    if context == "fork":  # spawn starts slowly (each worker imports torch): one loader is enough there
        assert_same(gather(DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2)), main)
