from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.cluster import KMeans

from pipeline.cache.geometry import IGNORE, PATCH, fit_geometry
from pipeline.errors import ConfigError, LabelError
from pipeline.figures.kmeans import (
    PAD_LABEL,
    cluster_image,
    cluster_joint,
    dataset_shape_score,
    hungarian_score,
    pca_rgb,
    pca_to_original,
    to_original,
)

GRID = 8
C = 16


def disk_tokens(rng: np.random.Generator, centre: tuple[float, float], radius: float, pad: float = 0.0):
    """(GRID, GRID, C) float16 tokens of a wide image (content rows 2..5) with a disk of distinct tokens,
    the (GRID, GRID) int region map (1 = disk, 0 = background, -1 = padding) and the geometry."""
    geom = fit_geometry(height=50, width=100, size=GRID * PATCH)
    content = geom.content_mask(grid=GRID)
    yy, xx = np.mgrid[:GRID, :GRID]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    region = np.where(content, disk.astype(np.int64), -1)
    means = np.stack([np.ones(C), -np.ones(C)]) + rng.normal(0, 0.3, (2, C))
    tokens = means[np.clip(region, 0, 1)] + rng.normal(0, 0.1, (GRID, GRID, C))
    tokens[~content] = pad
    return tokens.astype(np.float16), region, geom


def test_geometry_of_fixture_has_padding_rows():
    _, region, _ = disk_tokens(np.random.default_rng(0), (3.5, 4), 1.5)
    assert (region[:2] == -1).all()
    assert (region[6:] == -1).all()
    assert (region[2:6] >= 0).all()


def test_clusters_recover_disk_and_background():
    tokens, region, geom = disk_tokens(np.random.default_rng(1), (3.5, 3), 1.6)
    res = cluster_image(tokens, geom, k=2)
    content = region >= 0
    assert res.labels.dtype == np.int16
    assert res.labels.shape == (GRID, GRID)
    assert res.centroids.shape == (2, C)
    assert res.centroids.dtype == np.float32
    score = hungarian_score(res.labels[content], region[content].astype(np.uint8), num_classes=2)
    assert score.miou == pytest.approx(1.0)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-2)


def test_padding_never_enters_clustering():
    rng = np.random.default_rng(2)
    clean, region, geom = disk_tokens(rng, (3.5, 4), 1.5, pad=0.0)
    dirty = clean.copy()
    pad = region < 0
    dirty[pad] = np.float16(6e4)
    dirty[0, 0] = np.nan
    a = cluster_image(clean, geom, k=3, seed=5)
    b = cluster_image(dirty, geom, k=3, seed=5)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia
    assert (b.labels[pad] == PAD_LABEL).all()
    assert (b.labels[~pad] >= 0).all()
    # Independent reference: scikit-learn on the content tokens alone, normalised by hand.
    x = clean[~pad].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ref = KMeans(n_clusters=3, n_init=4, random_state=5).fit(x)
    np.testing.assert_array_equal(b.labels[~pad], ref.labels_)
    assert b.inertia == pytest.approx(ref.inertia_, rel=1e-4)


def test_unnormalised_clustering_uses_raw_tokens():
    tokens, region, geom = disk_tokens(np.random.default_rng(3), (3.5, 4), 1.5)
    res = cluster_image(tokens, geom, k=2, normalize=False)
    x = tokens[region >= 0].astype(np.float32)
    ref = KMeans(n_clusters=2, n_init=4, random_state=0).fit(x)
    np.testing.assert_array_equal(res.labels[region >= 0], ref.labels_)


def test_joint_clustering_gives_consistent_labels():
    rng = np.random.default_rng(4)
    # Same two token distributions in every image, disks in different places.
    base, _, geom = disk_tokens(rng, (3.5, 4), 1.5)
    content = geom.content_mask(grid=GRID)
    means = np.stack([base[2, 0].astype(np.float64), base[3, 4].astype(np.float64)])
    tokens_list, regions = [], []
    for cx in (1, 4, 6):
        yy, xx = np.mgrid[:GRID, :GRID]
        disk = ((yy - 3.5) ** 2 + (xx - cx) ** 2 <= 1.6**2).astype(np.int64)
        t = means[disk] + rng.normal(0, 0.05, (GRID, GRID, C))
        t[~content] = 0
        tokens_list.append(t.astype(np.float16))
        regions.append(np.where(content, disk, -1))
    results = cluster_joint(tokens_list, [geom] * 3, k=2)
    disk_ids = {int(np.unique(r.labels[reg == 1]).item()) for r, reg in zip(results, regions, strict=True)}
    bg_ids = {int(np.unique(r.labels[reg == 0]).item()) for r, reg in zip(results, regions, strict=True)}
    assert len(disk_ids) == 1
    assert len(bg_ids) == 1
    assert disk_ids != bg_ids
    for r in results[1:]:
        np.testing.assert_array_equal(r.centroids, results[0].centroids)
    for r, reg in zip(results, regions, strict=True):
        assert (r.labels[reg < 0] == PAD_LABEL).all()
    # Per-image inertias add up to the inertia of one K-means over everything.
    x = np.concatenate([t[content].astype(np.float32) for t in tokens_list])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ref = KMeans(n_clusters=2, n_init=4, random_state=0).fit(x)
    assert sum(r.inertia for r in results) == pytest.approx(ref.inertia_, rel=1e-4)


def test_bad_inputs_raise():
    tokens, _, geom = disk_tokens(np.random.default_rng(5), (3.5, 4), 1.5)
    with pytest.raises(ConfigError, match="content tokens"):
        cluster_image(tokens, geom, k=33)
    with pytest.raises(ConfigError, match="at least 1"):
        cluster_image(tokens, geom, k=0)
    with pytest.raises(ConfigError, match="square grid"):
        cluster_image(tokens[:, :7], geom, k=2)
    with pytest.raises(ConfigError, match="does not divide"):
        cluster_image(tokens[:5, :5], geom, k=2)
    bad = tokens.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        cluster_image(bad, geom, k=2)
    with pytest.raises(ConfigError, match="geometries"):
        cluster_joint([tokens], [geom, geom], k=2)


def test_to_original_shape_and_no_padding_left():
    tokens, _region, geom = disk_tokens(np.random.default_rng(6), (3.5, 4), 1.5)
    res = cluster_image(tokens, geom, k=2)
    out = to_original(res.labels, geom)
    assert out.shape == (geom.height, geom.width)
    assert out.dtype == np.int16
    assert (out >= 0).all()
    # Pixels whose centre maps well inside a patch (> 2 canvas px from its border) carry that patch's label,
    # whichever nearest-neighbour convention the resize uses.
    y = (np.arange(geom.height) + 0.5) * geom.resized_height / geom.height + geom.pad_top
    x = (np.arange(geom.width) + 0.5) * geom.resized_width / geom.width + geom.pad_left
    inner_y, inner_x = np.abs((y + 7) % 14 - 7) > 2, np.abs((x + 7) % 14 - 7) > 2
    expect = res.labels[(y // 14).astype(int)][:, (x // 14).astype(int)]
    sel = inner_y[:, None] & inner_x[None, :]
    assert sel.sum() > 0.4 * sel.size
    np.testing.assert_array_equal(out[sel], expect[sel])


def test_pca_rgb_matches_svd_reference():
    tokens, region, geom = disk_tokens(np.random.default_rng(7), (3.5, 4), 1.5)
    rgb = pca_rgb(tokens, geom)
    content = region >= 0
    assert rgb.shape == (GRID, GRID, 3)
    assert rgb.dtype == np.float32
    assert (rgb[~content] == 0).all()
    np.testing.assert_allclose(rgb[content].min(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(rgb[content].max(axis=0), 1.0, atol=1e-6)
    x = tokens[content].astype(np.float64)
    x -= x.mean(axis=0)
    first = x @ np.linalg.svd(x, full_matrices=False)[2][0]
    ref = (first - first.min()) / (first.max() - first.min())
    got = rgb[content][:, 0].astype(np.float64)
    err = min(np.abs(got - ref).max(), np.abs(got - (1 - ref)).max())  # PCA sign is arbitrary
    assert err < 1e-4
    back = pca_to_original(rgb, geom)
    assert back.shape == (geom.height, geom.width, 3)
    assert back.min() >= 0
    assert back.max() <= 1


def _miou_of_mapping(clusters, gt, mapping, num_classes):
    """Per-pixel prediction from a cluster -> class mapping (unmapped = void), IoU over present classes."""
    pred = np.full(gt.shape, -1)
    for c, k in mapping.items():
        pred[clusters == c] = k
    valid = gt != IGNORE
    ious = []
    for k in np.unique(gt[valid]):
        p, g = (pred == k) & valid, (gt == k) & valid
        ious.append((p & g).sum() / (p | g).sum())
    return float(np.mean(ious))


def _brute_force(clusters, gt, num_classes):
    ids = sorted(np.unique(clusters).tolist())
    best = 0.0
    for targets in itertools.product([-1, *range(num_classes)], repeat=len(ids)):
        used = [t for t in targets if t >= 0]
        if len(used) != len(set(used)):
            continue
        mapping = {c: t for c, t in zip(ids, targets, strict=True) if t >= 0}
        best = max(best, _miou_of_mapping(clusters, gt, mapping, num_classes))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_hungarian_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    k, n_cls = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    # Blocky, correlated maps so that good matchings exist, plus noise and ignore pixels.
    gt = np.kron(rng.integers(0, n_cls, (3, 3)), np.ones((4, 4), dtype=np.int64)).astype(np.uint8)
    clusters = np.where(rng.random(gt.shape) < 0.7, gt % k, rng.integers(0, k, gt.shape))
    gt[rng.random(gt.shape) < 0.1] = IGNORE
    res = hungarian_score(clusters, gt, n_cls)
    assert res.miou == pytest.approx(_brute_force(clusters, gt, n_cls))
    assert res.miou == pytest.approx(_miou_of_mapping(clusters, gt, res.mapping, n_cls))
    assert len(set(res.mapping.values())) == len(res.mapping)
    present = np.unique(gt[gt != IGNORE])
    assert np.isnan(np.delete(res.per_class_iou, present)).all()
    assert res.miou == pytest.approx(res.per_class_iou[present].mean())


def test_hungarian_edge_cases():
    gt = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    perfect = hungarian_score(np.array([[7, 7, 3, 3]]), gt, 2)
    assert perfect.miou == 1.0
    assert perfect.mapping == {7: 0, 3: 1}
    # One cluster, two classes: one class matched (IoU 0.5), the other unmatched (0).
    one = hungarian_score(np.zeros((1, 4), dtype=np.int64), gt, 2)
    assert one.miou == pytest.approx(0.25)
    # The best matching pairs cluster 2 with class 1 although they do not touch: that pair is left out.
    forced = hungarian_score(np.array([[5, 5, 5, 2, 5]]), np.array([[0, 0, 0, 0, 1]], np.uint8), 2)
    assert forced.mapping == {5: 0}
    assert forced.miou == pytest.approx(0.3)
    empty = hungarian_score(np.zeros((1, 4), dtype=np.int64), np.full((1, 4), IGNORE, np.uint8), 2)
    assert np.isnan(empty.miou)
    assert empty.mapping == {}
    with pytest.raises(LabelError):
        hungarian_score(np.zeros((1, 4), dtype=np.int64), np.array([[0, 5, 0, 0]], np.uint8), 2)
    with pytest.raises(ConfigError, match="shape"):
        hungarian_score(np.zeros((2, 4), dtype=np.int64), gt, 2)


def test_dataset_shape_score_is_per_image_mean():
    gt = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    pairs = [
        (np.array([[1, 1, 0, 0]]), gt),  # 1.0
        (np.zeros((1, 4), dtype=np.int64), gt),  # 0.25
        (np.zeros((1, 4), dtype=np.int64), np.full((1, 4), IGNORE, np.uint8)),  # no labels: skipped
    ]
    done = []
    score = dataset_shape_score(pairs, 2, progress=done.append)
    assert score.miou == pytest.approx(0.625)
    assert score.per_image[:2] == pytest.approx((1.0, 0.25))
    assert np.isnan(score.per_image[2])
    assert sum(done) == 3
