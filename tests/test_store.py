"""Tests of the zarr feature store: layout, shard bookkeeping, concurrent writers, reading, errors."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache.schema import DIMENSION_NAMES, SCHEMA_VERSION, default_images_per_shard
from pipeline.cache.store import FeatureStore
from pipeline.errors import StoreError

N, S, VIEWS, GRID, C, SIZE = 10, 4, ("original", "hflip"), (2, 2), 8, 28
ATTRS = {
    "backbone": "dinov2_vits14",
    "weights_sha256": "ab" * 32,
    "weights_source": "/weights/dinov2_vits14_pretrain.pth",
    "layers": [11],
    "size": SIZE,
    "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "extract_config": {"batch_size": 4, "views": list(VIEWS)},
}


def make_data(n: int = N, grid: tuple[int, int] = GRID, c: int = C, views: int = len(VIEWS), seed: int = 0):
    """Synthetic (tokens, cls, geometry, status) for n images; image 3 failed (zeros, status 2)."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((n, views, *grid, c)).astype(np.float16)
    cls = rng.standard_normal((n, views, c)).astype(np.float16)
    geometry = rng.integers(0, 500, (n, 6), dtype=np.int32)
    status = np.ones(n, np.uint8)
    if n > 3:
        tokens[3], cls[3], status[3] = 0, 0, 2
    return tokens, cls, geometry, status


def create(path: Path, n: int = N, per_shard: int | None = S, **kw) -> FeatureStore:
    ids = kw.pop("ids", [f"2007_{i:06d}" for i in range(n)])
    return FeatureStore.create(
        path,
        ids=ids,
        views=kw.pop("views", VIEWS),
        grid=kw.pop("grid", GRID),
        channels=kw.pop("channels", C),
        attrs=kw.pop("attrs", ATTRS),
        images_per_shard=per_shard,
        sources=kw.pop("sources", [f"JPEGImages/{i}.jpg" for i in ids]),
    )


def write(store: FeatureStore, data, shards=None) -> None:
    for k in range(store.n_shards) if shards is None else shards:
        a, b = store.shard_range(k)
        store.write_shard(k, *(x[a:b] for x in data))


@pytest.fixture
def full(tmp_path):
    data = make_data()
    store = create(tmp_path / "train.zarr")
    write(store, data)
    return tmp_path / "train.zarr", data


def test_default_images_per_shard():
    assert default_images_per_shard((32, 32), 1024, 1) == 64  # 2 MiB per image
    assert default_images_per_shard((32, 32), 1024, 2) == 32
    assert default_images_per_shard((32, 32), 384, 1) == 171  # 0.75 MiB per image
    assert default_images_per_shard((37, 37), 1536, 2, target_bytes=1000) == 1


def test_round_trip(full):
    from pipeline.cache.geometry import Geometry  # imported here: it loads torch, which spawned writers need not

    path, (tokens, cls, geometry, status) = full
    store = FeatureStore.open(path)
    assert store.ids == [f"2007_{i:06d}" for i in range(N)]
    assert store.sources == [f"JPEGImages/{i}.jpg" for i in store.ids]
    assert (store.n_images, store.views, store.n_views, store.grid, store.channels) == (N, list(VIEWS), 2, GRID, C)
    assert (store.images_per_shard, store.n_shards, store.size, store.layers) == (S, 3, SIZE, [11])
    assert store.backbone == "dinov2_vits14"
    for key, value in ATTRS.items():
        assert store.attrs[key] == value
    assert store.attrs["ssvt_schema"] == SCHEMA_VERSION
    assert store.attrs["dtype"] == "float16"
    assert "ids" not in store.attrs
    np.testing.assert_array_equal(store.read_tokens(0, N), tokens)
    np.testing.assert_array_equal(store.read_tokens(2, 7, view=1), tokens[2:7, 1])
    np.testing.assert_array_equal(store.read_cls(), cls)
    np.testing.assert_array_equal(store.geometry(), geometry)
    np.testing.assert_array_equal(store.status(), status)
    assert store.geometries() == [Geometry.from_row(r, SIZE) for r in geometry]
    assert store.geometries()[0].canvas == SIZE


def test_plain_zarr_reads_the_layout(full):
    """The contract of cache_layout.md, read with zarr alone."""
    from pipeline.cache.geometry import GEOMETRY_COLUMNS

    path, (tokens, cls, geometry, status) = full
    group = zarr.open_group(path, mode="r")
    t = group["tokens"]
    assert (t.dtype, t.shape, t.chunks, t.shards) == (np.float16, (N, 2, *GRID, C), (1, 1, *GRID, C), (S, 2, *GRID, C))
    assert t.compressors == ()
    assert (group["cls"].chunks, group["geometry"].chunks, group["status"].chunks) == ((S, 2, C), (S, 6), (S,))
    assert group["shard_done"].chunks == (1,)
    assert group["geometry"].attrs["columns"] == list(GEOMETRY_COLUMNS)
    np.testing.assert_array_equal(t[:], tokens)
    np.testing.assert_array_equal(group["cls"][:], cls)
    np.testing.assert_array_equal(group["geometry"][:], geometry)
    np.testing.assert_array_equal(group["status"][:], status)
    np.testing.assert_array_equal(group["shard_done"][:], [1, 1, 1])
    assert group.attrs["ids"][5] == "2007_000005"
    dims = {name: group[name].metadata.dimension_names for name in DIMENSION_NAMES}
    assert dims == {
        "tokens": ("image", "view", "row", "col", "channel"),
        "cls": ("image", "view", "channel"),
        "geometry": ("image", "geometry_field"),
        "status": ("image",),
        "shard_done": ("shard",),
    }
    coords = {"image": group.attrs["ids"], "view": list(VIEWS), "geometry_field": list(GEOMETRY_COLUMNS)}
    for name, values in coords.items():
        coord = group[name]
        assert (coord.metadata.dimension_names, coord.metadata.to_dict()["data_type"]) == ((name,), "string")
        assert coord[:].tolist() == values
    # one shard file per shard; the last one holds only its 2 images (no padding chunks)
    shard_files = sorted((path / "tokens" / "c").rglob("*"))
    sizes = [p.stat().st_size for p in shard_files if p.is_file()]
    per_image = 2 * GRID[0] * GRID[1] * C * 2
    assert sorted(sizes) == sorted([4 * per_image + 2 * 16 * 4 + 4] * 2 + [2 * per_image + 2 * 16 * 4 + 4])


def test_xarray_opens_the_store(full):
    """cache_layout.md, "Reading with xarray": one Dataset, the ids as a coordinate, no warning (-W error)."""
    xr = pytest.importorskip("xarray")
    from pipeline.cache.geometry import GEOMETRY_COLUMNS

    path, _ = full
    store = FeatureStore.open(path)
    with xr.open_zarr(path, consolidated=False) as ds:
        assert {name: ds[name].dims for name in DIMENSION_NAMES} == DIMENSION_NAMES
        assert (ds.tokens.dtype, ds.cls.dtype, ds.geometry.dtype, ds.status.dtype) == (np.float16, np.float16, np.int32, np.uint8)
        assert set(ds.coords) == {"image", "view", "geometry_field"}
        assert ds.image.values.tolist() == store.ids
        assert ds.view.values.tolist() == store.views
        assert ds.geometry_field.values.tolist() == list(GEOMETRY_COLUMNS)
        np.testing.assert_array_equal(ds.tokens.values, store.read_tokens(0, N))  # image 3 (failed) stays zeros
        np.testing.assert_array_equal(ds.cls.values, store.read_cls())
        np.testing.assert_array_equal(ds.geometry.values, store.geometry())
        np.testing.assert_array_equal(ds.status.values, store.status())
        one = ds.sel(image="2007_000005")
        np.testing.assert_array_equal(one.tokens.sel(view="hflip").values, store.read_tokens(5, 6, view=1)[0])
        assert int(one.geometry.sel(geometry_field="pad_left")) == store.geometry()[5, 5]
        assert int(one.status) == store.status()[5]
        np.testing.assert_array_equal(ds.cls.sel(image=["2007_000009", "2007_000001"]).values, store.read_cls()[[9, 1]])


def _as_layout_without_coordinates(path: Path) -> None:
    """Turn a store into the schema-1 layout written before the coordinate arrays existed: no
    ``image``/``view``/``geometry_field`` arrays, and dimension names on ``tokens`` only."""
    for name in ("image", "view", "geometry_field"):
        shutil.rmtree(path / name)
    for name in ("cls", "geometry", "status", "shard_done"):
        meta = json.loads((path / name / "zarr.json").read_text())
        del meta["dimension_names"]
        (path / name / "zarr.json").write_text(json.dumps(meta, indent=2))


def test_store_without_coordinates_opens_resumes_and_keeps_its_layout(tmp_path):
    path, (tokens, cls, geometry, status) = tmp_path / "old.zarr", make_data()
    write(create(path), (tokens, cls, geometry, status), shards=[0])
    _as_layout_without_coordinates(path)
    meta_before = {p: p.read_bytes() for p in path.rglob("zarr.json")}
    resumed = FeatureStore.open(path, "r+")
    assert (resumed.ids, resumed.missing_shards()) == ([f"2007_{i:06d}" for i in range(N)], [1, 2])
    write(resumed, (tokens, cls, geometry, status), shards=[1, 2])
    store = FeatureStore.open(path)
    assert store.is_complete()
    assert store.fingerprint() == create(tmp_path / "new.zarr").fingerprint()
    np.testing.assert_array_equal(store.read_tokens(0, N), tokens)
    assert store._direct is not None
    for indices, block in store.iter_shards(shuffle_seed=3):
        np.testing.assert_array_equal(block, tokens[indices])
    np.testing.assert_array_equal(store.read_cls(), cls)
    np.testing.assert_array_equal(store.geometry(), geometry)
    np.testing.assert_array_equal(store.status(), status)
    assert {p: p.read_bytes() for p in path.rglob("zarr.json")} == meta_before  # still the old layout
    assert not any((path / name).exists() for name in ("image", "view", "geometry_field"))


def test_patch_is_recorded_and_defaults_to_14(tmp_path):
    p16 = create(tmp_path / "p16.zarr", grid=(4, 4), attrs={**ATTRS, "size": 64, "patch": 16})
    assert (p16.patch, p16.size, p16.grid, p16.info()["patch"]) == (16, 64, (4, 4), 16)
    assert zarr.open_group(tmp_path / "p16.zarr", mode="r").attrs["patch"] == 16
    assert all(g.canvas == 64 for g in p16.geometries())
    p14 = create(tmp_path / "p14.zarr")  # a caller that names no patch gets DINOv2's
    assert (p14.patch, p14.attrs["patch"]) == (14, 14)


def test_store_without_the_patch_attribute_opens_with_patch_14(tmp_path):
    path, data = tmp_path / "old.zarr", make_data()
    write(create(path), data, shards=[0])
    meta = json.loads((path / "zarr.json").read_text())  # schema 1 as written before `patch`
    del meta["attributes"]["patch"]
    (path / "zarr.json").write_text(json.dumps(meta, indent=2))
    before = (path / "zarr.json").read_bytes()
    resumed = FeatureStore.open(path, "r+")
    assert (resumed.patch, resumed.grid, resumed.size) == (14, GRID, SIZE)
    write(resumed, data, shards=[1, 2])
    store = FeatureStore.open(path)
    assert store.is_complete()
    assert store.info()["patch"] == 14
    assert store.fingerprint() == create(tmp_path / "new.zarr").fingerprint()  # the patch is not hashed
    assert (path / "zarr.json").read_bytes() == before


def test_patch_that_contradicts_the_grid_is_damaged_metadata(full):
    path, _ = full
    zarr.open_group(path, mode="r+").attrs["patch"] = 16
    with pytest.raises(StoreError, match=r"damaged metadata \(grid \[2, 2\] is not size 28 / patch 16\)"):
        FeatureStore.open(path)


def test_shard_file_bytes_follow_cache_layout(full):
    """A second reader: decode the last (partial) tokens shard from its bytes as cache_layout.md says."""
    path, (tokens, *_) = full
    raw = (path / "tokens" / "c" / "2" / "0" / "0" / "0" / "0").read_bytes()
    index = np.frombuffer(raw[-(S * 2 * 16 + 4) : -4], "<u8").reshape(S, 2, 2)  # (image, view, offset/nbytes)
    assert (index[2:] == 2**64 - 1).all()  # images past N: no bytes
    for i in range(2):
        for v in range(2):
            offset, nbytes = index[i, v]
            chunk = np.frombuffer(raw[offset : offset + nbytes], "<f2").reshape(*GRID, C)
            np.testing.assert_array_equal(chunk, tokens[8 + i, v])


def test_shard_ranges_and_clamp(tmp_path):
    store = create(tmp_path / "a.zarr")
    assert [store.shard_range(k) for k in range(store.n_shards)] == [(0, 4), (4, 8), (8, 10)]
    assert [store.shard_of(i) for i in range(N)] == [i // S for i in range(N)]
    with pytest.raises(StoreError, match="shard 3 out of range"):
        store.shard_range(3)
    with pytest.raises(StoreError, match="image 10 out of range"):
        store.shard_of(10)
    big = create(tmp_path / "b.zarr", per_shard=1000)
    assert (big.images_per_shard, big.n_shards, big.shard_range(0)) == (N, 1, (0, N))
    auto = create(tmp_path / "c.zarr", per_shard=None)
    assert auto.images_per_shard == N  # the default (~128 MB shards) clamped to N


@pytest.mark.parametrize(
    ("part", "bad", "match"),
    [
        (0, lambda x: x[:3], r"tokens is float16\(3, 2, 2, 2, 8\), expected float16\(4, 2, 2, 2, 8\)"),
        (0, lambda x: x.astype(np.float32), "tokens is float32"),
        (1, lambda x: x[:, :1], "cls is float16"),
        (2, lambda x: x.astype(np.int64), "geometry is int64"),
        (3, lambda x: x.astype(bool), "status is bool"),
        (3, lambda x: np.zeros_like(x), "status must be 1 .ok. or 2 .failed., got 0"),
        (1, lambda x: x.tolist(), "cls is a list, expected float16"),
        (0, lambda x: x + np.float16(1), "status 2 .failed. must have all-zero tokens"),
    ],
)
def test_write_shard_validation(tmp_path, part, bad, match):
    store = create(tmp_path / "s.zarr")
    data = [x[:S] for x in make_data()]
    data[part] = bad(data[part])
    with pytest.raises(StoreError, match=match):
        store.write_shard(0, *data)
    assert store.missing_shards() == [0, 1, 2]


def test_write_needs_r_plus(full):
    path, data = full
    with pytest.raises(StoreError, match="read-only"):
        FeatureStore.open(path).write_shard(0, *(x[:S] for x in data))


def test_partial_store_reports_missing_and_resumes(tmp_path):
    path, data = tmp_path / "p.zarr", make_data()
    write(create(path), data, shards=[0, 2])
    store = FeatureStore.open(path)
    np.testing.assert_array_equal(store.done_shards(), [True, False, True])
    assert (store.missing_shards(), store.is_complete()) == ([1], False)
    np.testing.assert_array_equal(store.status()[4:8], 0)
    assert store.info()["not_written"] == 4
    with pytest.raises(StoreError, match="1 of 3 shards not written"):
        next(store.iter_shards())
    write(FeatureStore.open(path, "r+"), data, shards=[1])
    assert FeatureStore.open(path).is_complete()
    np.testing.assert_array_equal(FeatureStore.open(path).read_tokens(0, N), data[0])


def _write_shards(path: str, shards: list[int]) -> None:
    store = FeatureStore.open(path, mode="r+")
    write(store, make_data(store.n_images), shards)


def test_two_processes_write_disjoint_shards(tmp_path):
    path = tmp_path / "mp.zarr"
    create(path, n=23, per_shard=3)  # 8 shards, the last one partial
    meta_before = {p: p.read_bytes() for p in path.rglob("zarr.json")}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_shards, args=(str(path), list(range(k, 8, 2)))) for k in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    store = FeatureStore.open(path)
    assert store.is_complete()
    tokens, cls, geometry, status = make_data(23)
    np.testing.assert_array_equal(store.read_tokens(0, 23), tokens)
    np.testing.assert_array_equal(store.read_cls(), cls)
    np.testing.assert_array_equal(store.geometry(), geometry)
    np.testing.assert_array_equal(store.status(), status)
    assert {p: p.read_bytes() for p in path.rglob("zarr.json")} == meta_before  # writers never touch metadata


@pytest.mark.parametrize("images_per_read", [1, 3, 8])
@pytest.mark.parametrize("seed", [None, 7])
def test_iter_shards_covers_every_image_once(tmp_path, seed, images_per_read):
    tokens = make_data(23)[0]
    path = tmp_path / "it.zarr"
    write(create(path, n=23, per_shard=5), make_data(23))
    store = FeatureStore.open(path)
    seen, buffers = [], []
    for indices, batch in store.iter_shards(shuffle_seed=seed, images_per_read=images_per_read):
        assert len({store.shard_of(int(i)) for i in indices}) == 1  # shard-aligned
        np.testing.assert_array_equal(batch, tokens[indices])
        seen.append(indices.copy())
        buffers.append(batch)
    order = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(order), np.arange(23))
    assert np.shares_memory(buffers[0], buffers[1])  # one reused buffer, as documented
    if seed is None:
        np.testing.assert_array_equal(order, np.arange(23))
    else:
        assert not np.array_equal(order, np.arange(23))
        again = np.concatenate([i.copy() for i, _ in store.iter_shards(shuffle_seed=seed)])
        np.testing.assert_array_equal(order, again)
        other = np.concatenate([i.copy() for i, _ in store.iter_shards(shuffle_seed=seed + 1)])
        assert not np.array_equal(order, other)


def test_read_tokens_into_reused_buffer(full):
    path, (tokens, *_) = full
    store = FeatureStore.open(path)
    out = np.full((3, 2, *GRID, C), np.nan, np.float16)
    for start in (0, 5, 7):
        assert store.read_tokens(start, start + 3, out=out) is out
        np.testing.assert_array_equal(out, tokens[start : start + 3])
    one_view = np.empty((3, *GRID, C), np.float16)
    np.testing.assert_array_equal(store.read_tokens(1, 4, view=0, out=one_view), tokens[1:4, 0])
    with pytest.raises(StoreError, match="out must be"):
        store.read_tokens(0, 2, out=out)
    with pytest.raises(StoreError, match="out must be"):
        store.read_tokens(0, 3, out=out.astype(np.float32))
    with pytest.raises(StoreError, match="out of bounds"):
        store.read_tokens(8, 11)
    with pytest.raises(StoreError, match="view 2 out of range"):
        store.read_tokens(0, 1, view=2)


def test_info_sizes_and_label_sets(tmp_path):
    n, grid, c = 20, (32, 32), 32  # size 448, 64 KB per image
    path = tmp_path / "train.zarr"
    attrs = {**ATTRS, "size": 448}
    store = create(path, n=n, per_shard=8, views=["original"], grid=grid, channels=c, attrs=attrs)
    write(store, make_data(n, grid, c, views=1))
    (tmp_path / "train.labels.scribble.h5").write_bytes(b"")
    (tmp_path / "val.labels.gt.h5").write_bytes(b"")
    info = FeatureStore.open(path).info()
    raw = n * 1 * 32 * 32 * c * 2
    on_disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert (info["raw_token_bytes"], info["bytes_on_disk"]) == (raw, on_disk)
    assert raw < on_disk < 1.02 * raw
    assert (info["ok"], info["failed"], info["not_written"]) == (19, 1, 0)
    assert (info["done_shards"], info["n_shards"], info["complete"]) == (3, 3, True)
    assert (info["images_per_shard"], info["shard_bytes"]) == (8, 8 * 32 * 32 * c * 2)
    assert (info["backbone"], info["grid"], info["views"], info["n_images"]) == (
        "dinov2_vits14",
        [32, 32],
        ["original"],
        n,
    )
    assert info["label_sets"] == [{"name": "scribble", "path": str(tmp_path / "train.labels.scribble.h5")}]
    json.dumps(info)  # printable as JSON by the CLI


def test_same_inputs_give_identical_bytes_and_fingerprint(tmp_path):
    paths = [tmp_path / "one.zarr", tmp_path / "two.zarr"]
    for p in paths:
        write(create(p), make_data())
    files = [{q.relative_to(p): q.read_bytes() for q in p.rglob("*") if q.is_file()} for p in paths]
    assert files[0].keys() == files[1].keys()
    differing = [k for k in files[0] if files[0][k] != files[1][k]]
    assert differing in ([], [Path("zarr.json")])  # only the group metadata, through `created`
    attrs = [json.loads(f[Path("zarr.json")])["attributes"] for f in files]
    assert {k: v for k, v in attrs[0].items() if k != "created"} == {k: v for k, v in attrs[1].items() if k != "created"}
    one, two = (FeatureStore.open(p) for p in paths)
    assert one.fingerprint() == two.fingerprint()
    assert len(one.fingerprint()) == 64
    renamed = create(tmp_path / "ids.zarr", ids=[f"x{i}" for i in range(N)])
    reweighted = create(tmp_path / "w.zarr", attrs={**ATTRS, "weights_sha256": "cd" * 32})
    assert len({one.fingerprint(), renamed.fingerprint(), reweighted.fingerprint()}) == 3


def test_create_refuses_existing_path_and_remove(tmp_path):
    path = tmp_path / "e.zarr"
    create(path)
    assert FeatureStore.exists(path)
    with pytest.raises(StoreError, match=r"already exists.*--overwrite"):
        create(path)
    FeatureStore.remove(path)
    assert not path.exists()
    assert not FeatureStore.exists(path)
    FeatureStore.remove(path)  # removing nothing is fine
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError, match="refusing to delete"):
        FeatureStore.remove(tmp_path / "precious")
    with pytest.raises(StoreError, match="refusing to delete"):
        FeatureStore.remove(tmp_path / "precious" / "thesis.tex")
    assert (tmp_path / "precious" / "thesis.tex").is_file()
    (tmp_path / "empty.zarr").mkdir()  # e.g. made by hand before extracting
    FeatureStore.remove(tmp_path / "empty.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no temporary folder left behind


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"grid": (3, 3)}, r"grid \(3, 3\) does not fit size 28"),
        ({"attrs": {**ATTRS, "patch": 16}}, r"grid \(2, 2\) does not fit size 28 at patch 16: expected \(1, 1\)"),
        ({"attrs": {**ATTRS, "patch": 0}}, "'patch' must be a positive int, got 0"),
        ({"attrs": {**ATTRS, "patch": 14.0}}, "'patch' must be a positive int, got 14.0"),
        ({"attrs": {k: v for k, v in ATTRS.items() if k != "backbone"}}, "'backbone' is missing"),
        ({"attrs": {**ATTRS, "layers": []}}, "non-empty list of ints"),
        ({"attrs": {**ATTRS, "extra": np.float32(1)}}, "'extra' must be plain JSON"),
        ({"attrs": {**ATTRS, "channels": 9}}, "'channels' is 9 but the store computes 8"),
        ({"ids": [*map(str, range(N - 1)), "3"]}, "ids must be distinct: '3' appears more than once"),
        ({"views": ["original", "original"]}, "views must be distinct"),
        ({"sources": ["x"]}, f"got 1 sources for {N} ids"),
    ],
)
def test_create_validates(tmp_path, kw, match):
    with pytest.raises(StoreError, match=match):
        create(tmp_path / "v.zarr", **kw)
    assert not (tmp_path / "v.zarr").exists()


def test_unwritable_path(tmp_path):
    if os.geteuid() == 0:  # root ignores permissions: a path under a regular file cannot be created
        (tmp_path / "file.txt").write_text("not a folder")
        path = tmp_path / "file.txt" / "store.zarr"
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        path = tmp_path / "ro" / "store.zarr"
    with pytest.raises(StoreError, match=f"while creating {path}"):
        create(path)


def test_disk_full_is_a_store_error(full, monkeypatch):
    path, data = full
    store = FeatureStore.open(path, "r+")

    async def no_space(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.storage.LocalStore, "set", no_space)
    with pytest.raises(StoreError, match=f"disk full while writing shard 1 of {path}.*choose --out elsewhere"):
        store.write_shard(1, *(x[4:8] for x in data))


def test_schema_too_new_is_refused(full):
    path, _ = full
    zarr.open_group(path, mode="r+").attrs["ssvt_schema"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="upgrade ssvt"):
        FeatureStore.open(path)


def test_open_non_store(tmp_path):
    with pytest.raises(StoreError, match=r"no feature store.*ssvt extract"):
        FeatureStore.open(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not an ssvt feature store"):
        FeatureStore.open(tmp_path / "empty")
    (tmp_path / "file.zarr").write_text("hello")
    with pytest.raises(StoreError, match="not an ssvt feature store"):
        FeatureStore.open(tmp_path / "file.zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w").create_array("x", shape=(2,), dtype="uint8")
    with pytest.raises(StoreError, match="no 'ssvt_schema'"):
        FeatureStore.open(tmp_path / "other.zarr")
    with pytest.raises(StoreError, match="mode must be"):
        FeatureStore.open(tmp_path / "other.zarr", mode="w")  # type: ignore[arg-type]
