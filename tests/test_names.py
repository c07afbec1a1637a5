"""The cache layer's names: canonical cache folders, 0.1 names still found, sibling splits, label sets,
run folders, status codes, and a store identity whose fingerprint did not change."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.names import (
    AblationFiles,
    CacheLayout,
    ImageStatus,
    RunFiles,
    StoreIdentity,
    cache_name,
    label_set_path,
    label_set_paths,
    layers_name,
    legacy_cache_name,
    sibling_store,
)
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig
from pipeline.errors import ConfigError
from pipeline.features.data import find_images
from pipeline.features.extract import extract, plan_extract, resolved_layers, store_path
from pipeline.workspace import Workspace


@pytest.mark.parametrize(
    ("layers", "depth", "name"),
    [
        ((23,), 24, "last"),
        ((20, 21, 22, 23), 24, "last4"),
        ((8, 9, 10, 11), 12, "last4"),
        ((0, 1), 2, "last2"),
        ((20, 21, 22), 24, "20_21_22"),  # not the last blocks
        ((23, 22, 21, 20), 24, "23_22_21_20"),  # another order is another channel layout
        ((5,), 12, "5"),
    ],
)
def test_layers_name_is_canonical(layers, depth, name):
    assert layers_name(layers, depth) == name


@pytest.mark.parametrize("spelling", ["last4", "20,21,22,23", "-4,-3,-2,-1", " 20, 21,22 ,23"])
def test_every_spelling_of_the_same_blocks_gives_one_cache(tmp_path, spelling):
    layout = CacheLayout(tmp_path / "cache")
    cfg = ExtractConfig(model="dinov2_vitl14", size=448, layers=spelling)
    assert resolved_layers(cfg) == ((20, 21, 22, 23), 24)
    assert store_path(cfg, layout, "val") == tmp_path / "cache" / "dinov2_vitl14-448-last4" / "val.zarr"


def test_depth_overrides_and_random_init_name_the_cache(tmp_path):
    layout = CacheLayout(str(tmp_path))  # roots may be plain strings
    cfg = ExtractConfig(model="vit_tiny_test", size=56, layers="1,2", random_init=True, overrides={"num_hidden_layers": 3})
    assert store_path(cfg, layout, "train") == tmp_path / "vit_tiny_test-56-last2-random" / "train.zarr"
    assert cache_name("m", 224, (0,), 3, random_init=False) == "m-224-0"


def test_stores_written_under_the_01_name_are_still_found(tmp_path):
    layout = CacheLayout(tmp_path)
    cfg = ExtractConfig(model="dinov2_vits14", size=224, layers="8,9,10,11")
    legacy = tmp_path / legacy_cache_name("dinov2_vits14", 224, "8,9,10,11") / "val.zarr"
    assert legacy.parent.name == "dinov2_vits14-224-8_9_10_11"  # what ssvt 0.1 wrote
    canonical = tmp_path / "dinov2_vits14-224-last4" / "val.zarr"
    assert store_path(cfg, layout, "val") == canonical  # nothing on disk yet: the canonical name
    legacy.mkdir(parents=True)
    assert store_path(cfg, layout, "val") == legacy  # only the old one exists: found, not duplicated
    assert store_path(ExtractConfig(model="dinov2_vits14", size=224, layers="last4"), layout, "val") == canonical
    canonical.mkdir(parents=True)
    assert store_path(cfg, layout, "val") == canonical  # both exist: the canonical one wins


def test_find_store_by_name_or_the_only_cache(tmp_path):
    layout = CacheLayout(tmp_path / "cache", tmp_path / "runs")
    with pytest.raises(ConfigError, match="run `ssvt extract` first"):
        layout.find_store("val")
    (tmp_path / "cache" / "a-224-last" / "val.zarr").mkdir(parents=True)
    assert layout.find_store("val") == tmp_path / "cache" / "a-224-last" / "val.zarr"
    (tmp_path / "cache" / "b-224-last" / "val.zarr").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"several caches .*a-224-last, b-224-last.*--features"):
        layout.find_store("val")
    assert layout.find_store("val", "b-224-last") == tmp_path / "cache" / "b-224-last" / "val.zarr"
    with pytest.raises(ConfigError, match="check --features"):
        layout.find_store("val", "c-224-last")


def test_siblings_label_sets_and_run_folders(tmp_path):
    train = tmp_path / "cache" / "m-448-last" / "train_aug.zarr"
    assert sibling_store(train, "val") == tmp_path / "cache" / "m-448-last" / "val.zarr"
    assert sibling_store(str(train), "val") == sibling_store(train, "val")
    assert label_set_path(train, "eps") == train.parent / "train_aug.labels.eps.h5"
    train.parent.mkdir(parents=True)
    for name in ("eps", "scribble", "gt"):
        label_set_path(train, name).write_bytes(b"")
    (train.parent / "val.labels.gt.h5").write_bytes(b"")  # another store's set
    assert label_set_paths(train) == {n: label_set_path(train, n) for n in ("eps", "gt", "scribble")}

    layout = CacheLayout(tmp_path / "cache", tmp_path / "runs")
    first = layout.new_run_dir("eps-bn-linear")
    assert first == tmp_path / "runs" / "eps-bn-linear"
    first.mkdir(parents=True)
    assert layout.new_run_dir("eps-bn-linear") == tmp_path / "runs" / "eps-bn-linear-2"
    assert layout.run_dir("eps-bn-linear") == first
    files = RunFiles(first)
    assert not files.is_run()
    files.config.write_text("{}")
    assert files.is_run()
    names = {p.name for p in vars(files).values() if isinstance(p, Path) and p != files.dir}
    assert names == {"head.safetensors", "config.json", "history.json", "curve.png", "metrics.json", "confusion.npy",
                     "confusion.png", "train.log", "metrics.csv", "tb", "backbone.safetensors"}  # fmt: skip
    assert files.metrics_for("lin") == first / "metrics.lin.json"
    assert files.worst_for("cache") == first / "worst.png"
    assert files.confusion_figure_for("ms") == first / "confusion.ms.png"
    grid = AblationFiles(layout.ablation_dir("labels"))
    assert grid.dir == tmp_path / "ablations" / "labels"
    assert grid.cell("gt-linear-f-seed0") == grid.dir / "cells" / "gt-linear-f-seed0"


def test_workspace_layout_uses_its_folders(tmp_path):
    (tmp_path / "ssvt.toml").write_text('[dataset]\nroot = "data"\n[paths]\ncache = "c"\nruns = "r"\n')
    layout = Workspace.load(tmp_path / "ssvt.toml").layout
    assert (layout.cache, layout.runs) == (tmp_path / "c", tmp_path / "r")


def test_status_codes_are_the_documented_bytes():
    assert [int(s) for s in ImageStatus] == [0, 1, 2]
    assert [s.text for s in ImageStatus] == ["not written", "ok", "failed to decode (features zero)"]
    assert np.uint8(1) == ImageStatus.OK  # comparable with the store's uint8 array


IDENTITY = {
    "backbone": "dinov2_vits14", "weights_sha256": "ab" * 32, "layers": [8, 9, 10, 11], "size": 224,
    "grid": [16, 16], "channels": 1536, "views": ["original", "hflip"],
}  # fmt: skip


def test_fingerprint_is_the_01_hash():
    """Label sets and runs record store fingerprints: the formula must not change under them."""
    ids = ["2007_000032", "2007_000039"]
    old = {k: IDENTITY[k] for k in ("backbone", "weights_sha256", "layers", "size", "views")} | {"ids": ids}
    expected = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()
    identity = StoreIdentity.from_attrs(IDENTITY)
    assert identity.fingerprint(ids) == expected
    assert identity.fingerprint(ids[::-1]) != expected


def test_identity_for_heads_and_differences():
    identity = StoreIdentity.from_attrs(IDENTITY)
    assert identity.for_heads() == {k: IDENTITY[k] for k in ("backbone", "weights_sha256", "layers", "channels")}
    other = StoreIdentity.from_attrs({**IDENTITY, "size": 448, "grid": [32, 32]})
    assert identity.differences(other, ours="store has", theirs="this run has") == [
        "size: store has 224, this run has 448",
        "grid: store has [16, 16], this run has [32, 32]",
    ]
    assert identity.differences(identity, ours="a", theirs="b") == []


def test_a_01_store_is_resumed_and_trained_on_under_its_old_name(toy_copy: Path):
    """A workspace whose cache ssvt 0.1 wrote as ``<model>-<size>-2-random`` (layers typed as "2"):
    extracting again finds and resumes it instead of writing a second cache, and the store's own
    identity is what it recorded."""
    ws = Workspace.load(toy_copy / "ssvt.toml")
    cfg = ExtractConfig(model="vit_tiny_test", size=56, layers="2", random_init=True, workers=0)
    old = ws.cache_dir / "vit_tiny_test-56-2-random" / "val.zarr"
    extract(find_images(ws.data_root, "val"), old, cfg)  # as 0.1 named it
    ((split, items, path),) = plan_extract(cfg, ws, splits=["val"])
    assert split == "val"
    assert path == old
    again = extract(items, path, cfg)
    assert (again.shards_written, again.images_done) == (0, 0)
    assert sorted(p.name for p in ws.cache_dir.iterdir()) == ["vit_tiny_test-56-2-random"]
    assert ws.layout.find_store("val") == old
    store = FeatureStore.open(old)
    assert store.identity.layers == (2,)
    assert store.fingerprint() == store.identity.fingerprint(store.ids)


def test_the_cache_layer_needs_no_torch(modules_loaded_by):
    """Stores and label sets can be read, named and imported in an interpreter without torch loaded."""
    cache = "import pipeline.cache.store, pipeline.cache.names, pipeline.cache.labels, pipeline.cache.label_kinds"
    assert modules_loaded_by(cache, "torch", "transformers") == []
    assert "torch" in modules_loaded_by("import pipeline.devices", "torch")  # the probe sees torch when it is there


def test_public_api_resolves_lazily(modules_loaded_by):
    """Every name ``import pipeline`` exports resolves, and importing the package loads no torch."""
    import pipeline

    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
    assert sorted(dir(pipeline)) == sorted(pipeline.__all__)
    assert modules_loaded_by("import pipeline", "torch") == []
