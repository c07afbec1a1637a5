from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig, KMeansVizConfig
from pipeline.errors import ConfigError, DataError
from pipeline.features.data import ImageItem, find_images
from pipeline.features.extract import extract
from pipeline.figures.plots import LEGEND_IN, PANEL_IN, cluster_colors
from pipeline.figures.shape_prior import choose_images, kmeans_viz

TINY = {"model": "vit_tiny_test", "random_init": True, "size": 56, "workers": 0, "batch_size": 4, "flip": True}
PATCH = 14


@pytest.fixture(scope="module")
def dataset(toy, tmp_path_factory) -> tuple[list[ImageItem], Path]:
    """The 8 toy val images plus a wide and a tall crop of two train images (so that some token-grid
    patches are pure padding), with their masks: (items, mask folder)."""
    root = tmp_path_factory.mktemp("vizdata")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    items = []
    for image_id in toy.val_ids:
        items.append(ImageItem(image_id, Path(shutil.copy(toy.voc_root / "JPEGImages" / f"{image_id}.jpg", root / "images"))))
        shutil.copy(toy.voc_root / "SegmentationClass" / f"{image_id}.png", root / "masks")
    for name, image_id, wide in (("wide", toy.train_ids[0], True), ("tall", toy.train_ids[1], False)):
        with (
            Image.open(toy.voc_root / "JPEGImages" / f"{image_id}.jpg") as im,
            Image.open(toy.voc_root / "SegmentationClass" / f"{image_id}.png") as mask,
        ):
            w, h = im.size
            box = (0, 0, w, w // 3) if wide else (0, 0, h // 3, h)
            im.crop(box).save(root / "images" / f"{name}.png")
            mask.crop(box).save(root / "masks" / f"{name}.png")
        items.append(ImageItem(name, root / "images" / f"{name}.png"))
    return items, root / "masks"


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory) -> FeatureStore:
    """The dataset's 10 images on a 4 x 4 token grid, original and mirrored views."""
    out = tmp_path_factory.mktemp("viz") / "val.zarr"
    extract(dataset[0], out, ExtractConfig(**TINY))
    return FeatureStore.open(out)


@pytest.fixture(scope="module")
def gt(dataset) -> LabelSource:
    return LabelSource("gt", "mask", dataset[1])


def read_png(path: Path) -> tuple[str, np.ndarray, list[int] | None]:
    with Image.open(path) as im:
        return im.mode, np.asarray(im), im.getpalette()


def content_patches(g) -> np.ndarray:
    """(h, h) bool: patches whose pixel square meets the content rectangle (computed from the geometry row)."""
    h = g.canvas // PATCH
    lo = np.arange(h) * PATCH
    rows = (lo < g.pad_top + g.resized_height) & (lo + PATCH > g.pad_top)
    cols = (lo < g.pad_left + g.resized_width) & (lo + PATCH > g.pad_left)
    return rows[:, None] & cols[None, :]


def grid_to_pixels(grid: np.ndarray, g) -> np.ndarray:
    """(h, h) patch labels -> (H, W): each original pixel centre mapped onto the canvas, then to its patch."""
    ys = g.pad_top + np.floor((np.arange(g.height) + 0.5) * g.resized_height / g.height).astype(int)
    xs = g.pad_left + np.floor((np.arange(g.width) + 0.5) * g.resized_width / g.width).astype(int)
    return grid[ys[:, None] // PATCH, xs[None, :] // PATCH]


def unit_tokens(store: FeatureStore, index: int, view: int) -> np.ndarray:
    t = store.read_tokens(index, index + 1, view=view)[0].astype(np.float64)
    if store.views[view] == "hflip":
        t = t[:, ::-1]
    return t / np.linalg.norm(t, axis=-1, keepdims=True)


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - centroids[None].astype(np.float64)) ** 2).sum(-1).argmin(1)


def brute_miou(clusters: np.ndarray, gt: np.ndarray) -> float:
    """Best one-to-one cluster -> class matching by trying every assignment; mean IoU over present classes."""
    valid = gt != 255
    c, g = clusters[valid], gt[valid]
    classes, ids = np.unique(g), np.unique(c)
    iou = np.array([[((c == i) & (g == j)).sum() / ((c == i) | (g == j)).sum() for j in classes] for i in ids])
    slots = max(len(ids), len(classes))
    best = max(
        sum(iou[p[j], j] for j in range(len(classes)) if p[j] < len(ids))
        for p in itertools.permutations(range(slots), len(classes))
    )
    return best / len(classes)


@pytest.mark.parametrize("view", [0, 1])
def test_per_image_maps_are_content_only_kmeans_at_original_size(dataset, store, gt, tmp_path, view):
    cfg = KMeansVizConfig(dpi=40, ks=(2, 3), ids=("wide", store.ids[0], "tall", store.ids[3]), view=view)
    seen: list[int] = []
    res = kmeans_viz(store, tmp_path, cfg, gt=gt, progress=seen.append)
    assert res.ids == cfg.ids
    assert sum(seen) == 4
    assert [p.name for p in res.figures] == ["kmeans.png", "kmeans.pdf"]
    # image, 2 cluster maps, PCA and ground truth (+ its legend), 40 dpi
    assert read_png(res.figures[0])[1].shape[1] == round((5 * PANEL_IN + LEGEND_IN) * 40)
    assert res.figures[1].read_bytes().startswith(b"%PDF")
    assert all(p.is_file() for p in res.files)
    geoms = store.geometries()
    for image_id in ("wide", "tall"):  # some patches hold padding only
        assert not content_patches(geoms[store.ids.index(image_id)]).all()
    for k in cfg.ks:
        cents = np.load(tmp_path / f"centroids_k{k}.npz")
        assert sorted(cents.files) == sorted(res.ids)
        for image_id in res.ids:
            index = store.ids.index(image_id)
            g = geoms[index]
            h, w = read_png(dataset[0][index].path)[1].shape[:2]
            labels = np.load(tmp_path / "maps" / f"{image_id}_k{k}.npy")
            assert labels.shape == (h, w)
            assert labels.dtype == np.int16
            centroids = cents[image_id]
            assert centroids.shape == (k, store.channels)
            assert centroids.dtype == np.float32
            # K-means fixed point on the unit-normalised content tokens only: every label is the nearest
            # centroid and every centroid is the mean of its tokens (padding tokens would pull it away).
            content = content_patches(g)
            x = unit_tokens(store, index, view)[content]
            ref = nearest(x, centroids)
            for c in range(k):
                np.testing.assert_allclose(centroids[c], x[ref == c].mean(0), atol=1e-4)
            grid = np.full(content.shape, -1)
            grid[content] = ref
            assert (grid_to_pixels(grid, g) == labels).mean() > 0.99
            mode, png, palette = read_png(tmp_path / "maps" / f"{image_id}_k{k}.png")
            assert mode == "P"
            assert palette is not None
            np.testing.assert_array_equal(png, labels)
            pal = np.array(palette[: 3 * k]).reshape(k, 3)
            np.testing.assert_array_equal(pal, np.rint(cluster_colors(k) * 255))


def test_scores_are_the_best_matching_miou(store, gt, tmp_path):
    cfg = KMeansVizConfig(dpi=40, ks=(2, 4), n=3, seed=0, pca=False)
    res = kmeans_viz(store, tmp_path, cfg, gt=gt)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["per_image"]) == set(res.ids)
    for k in cfg.ks:
        per = []
        for image_id in res.ids:
            labels = np.load(tmp_path / "maps" / f"{image_id}_k{k}.npy")
            mask = read_png(gt.path / f"{image_id}.png")[1]
            expected = brute_miou(labels, mask)
            assert scores["per_image"][image_id][str(k)] == pytest.approx(expected, abs=1e-6)
            assert res.scores is not None
            assert res.scores[image_id][k] == pytest.approx(expected)
            assert 0.0 <= expected <= 1.0
            per.append(expected)
        assert scores["mean"][str(k)] == pytest.approx(np.mean(per), abs=1e-6)
        assert res.mean_scores is not None
        assert res.mean_scores[k] == pytest.approx(np.mean(per))


def test_joint_mode_shares_centroids_across_images(store, tmp_path):
    cfg = KMeansVizConfig(dpi=40, ks=(3,), n=4, seed=0, joint=True)
    res = kmeans_viz(store, tmp_path, cfg)
    assert not (tmp_path / "scores.json").exists()
    assert res.scores is None
    assert res.mean_scores is None
    assert not (tmp_path / "centroids_k3.npz").exists()
    assert read_png(res.figures[0])[1].shape[1] == round(3 * PANEL_IN * 40)  # image, K = 3, PCA
    centroids = np.load(tmp_path / "centroids_k3.npy")
    assert centroids.shape == (3, store.channels)
    geoms = store.geometries()
    members = []
    for image_id in res.ids:
        index = store.ids.index(image_id)
        content = content_patches(geoms[index])
        x = unit_tokens(store, index, 0)[content]
        ref = nearest(x, centroids)
        grid = np.full(content.shape, -1)
        grid[content] = ref
        labels = np.load(tmp_path / "maps" / f"{image_id}_k3.npy")
        assert (grid_to_pixels(grid, geoms[index]) == labels).mean() > 0.99
        members.append((x, ref))
    x_all = np.concatenate([x for x, _ in members])
    ref_all = np.concatenate([r for _, r in members])
    for c in range(3):  # each centroid is the mean over ALL images' tokens of its cluster
        np.testing.assert_allclose(centroids[c], x_all[ref_all == c].mean(0), atol=1e-4)
    assert len(np.unique(ref_all)) == 3


def test_record_describes_the_run(store, gt, tmp_path):
    cfg = KMeansVizConfig(dpi=40, ks=(2,), ids=(store.ids[6], store.ids[2]), pca=False)
    res = kmeans_viz(store, tmp_path, cfg, gt=gt)
    assert res.ids == (store.ids[6], store.ids[2])
    record = json.loads((tmp_path / "kmeans.json").read_text())
    assert KMeansVizConfig.from_dict(record["config"]) == cfg
    assert record["store_fingerprint"] == store.fingerprint()
    assert Path(record["store"]) == store.path.resolve()
    assert record["ids"] == list(res.ids)
    assert record["view"] == "original"
    assert record["gt"]["name"] == "gt"
    assert sorted(record["files"]) == sorted(str(p.relative_to(tmp_path)) for p in res.files if p.name != "kmeans.json")
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(f"{i}_k2.{e}" for i in res.ids for e in ("npy", "png"))


def test_random_choice_is_seeded_and_only_takes_extracted_images(store):
    picks = [choose_images(store, KMeansVizConfig(n=3, seed=s)) for s in range(6)]
    assert picks[0] == choose_images(store, KMeansVizConfig(n=3, seed=0))
    assert len({tuple(p) for p in picks}) > 1
    assert all(len(p) == 3 == len(set(p)) and p == sorted(p) for p in picks)
    assert sorted(choose_images(store, KMeansVizConfig(n=50))) == list(range(store.n_images))


def test_unknown_and_bad_choices_are_refused(store, gt, tmp_path):
    with pytest.raises(ConfigError, match=r"not in .*valid ids are e\.g\. \['2026_"):
        kmeans_viz(store, tmp_path, KMeansVizConfig(ids=(store.ids[0], "nope")), gt=gt)
    with pytest.raises(ConfigError, match="kind 'points-json'"):
        kmeans_viz(store, tmp_path, KMeansVizConfig(), gt=LabelSource("p", "points-json", gt.path))
    with pytest.raises(ConfigError, match="view 2 out of range"):
        kmeans_viz(store, tmp_path, KMeansVizConfig(view=2))
    n_wide = int(content_patches(store.geometries()[store.ids.index("wide")]).sum())
    with pytest.raises(ConfigError, match=f"only {n_wide} content tokens"):
        kmeans_viz(store, tmp_path, KMeansVizConfig(ks=(n_wide + 1,), ids=("wide",)))
    assert not (tmp_path / "kmeans.png").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ks": ()}, "at least one"),
        ({"ks": (2, 0)}, r"\[0\]"),
        ({"ks": (3, 3)}, "repeats"),
        ({"ids": ("a", "b", "a")}, r"ids repeat: \['a'\]"),
        ({"n": 0}, "n must be"),
        ({"dpi": 5}, "dpi must be"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KMeansVizConfig(**kwargs)


def test_failed_images_are_never_drawn_and_missing_files_are_named(toy_copy, tmp_path):
    items = find_images(toy_copy / "VOC2012", "val")[:3]
    items[2].path.write_bytes(b"not a jpeg")  # extracted with status "failed"
    extract(items, tmp_path / "s.zarr", ExtractConfig(**TINY))
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert list(store.status()) == [1, 1, 2]
    assert choose_images(store, KMeansVizConfig(n=5)) == [0, 1]
    with pytest.raises(ConfigError, match=f"without features .*{items[2].id}.*failed to decode"):
        choose_images(store, KMeansVizConfig(ids=(items[0].id, items[2].id)))
    shutil.move(items[1].path, tmp_path / "moved.jpg")
    with pytest.raises(DataError, match=items[1].path.name):
        kmeans_viz(store, tmp_path / "out", KMeansVizConfig(ids=(items[1].id,), ks=(2,)))
