from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.voc import CLASS_NAMES
from pipeline.errors import ConfigError
from pipeline.figures.plots import (
    CamRow,
    FigureRow,
    cam_figure,
    cluster_colors,
    colorize_clusters,
    confusion_figure,
    curve_figure,
    kmeans_figure,
    row_normalize,
)


def make_row(rng: np.random.Generator, image_id: str, h: int = 24, w: int = 32, with_score: bool = True) -> FigureRow:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    maps = {k: ((xx * k) // w).astype(np.int16) for k in (2, 4)}
    gt = np.zeros((h, w), dtype=np.uint8)
    gt[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2] = 15
    gt[0] = 255
    pca = rng.random((h, w, 3)).astype(np.float32)
    score = {2: 0.5, 4: 0.71} if with_score else None
    return FigureRow(image_id, image, maps, pca=pca, gt=gt, score=score)


def read_png(path):
    with Image.open(path) as im:
        return im.size, np.asarray(im.convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize(("show_pca", "show_gt", "title"), [(True, True, "shape prior"), (False, False, None)])
def test_kmeans_figure_writes_png_and_pdf(tmp_path, show_pca, show_gt, title):
    rng = np.random.default_rng(0)
    rows = [make_row(rng, "a"), make_row(rng, "b", h=36, w=24, with_score=False)]
    paths = kmeans_figure(
        rows, [2, 4], tmp_path / "sub" / "fig.v1", show_pca=show_pca, show_gt=show_gt, class_names=CLASS_NAMES,
        title=title, dpi=100,
    )  # fmt: skip
    assert [p.name for p in paths] == ["fig.v1.png", "fig.v1.pdf"]
    assert all(p.exists() for p in paths)
    size, pixels = read_png(paths[0])
    # Documented layout: 2-inch panels times each row's aspect (24/32 and 36/24), 0.4 inch per title
    # line, 1.4 inch legend column.
    ncols = 3 + int(show_pca) + int(show_gt)
    width = ncols * 2.0 + (1.4 if show_gt else 0.0)
    height = (2.0 * 0.75 + 0.4) + (2.0 * 1.5 + 0.4) + (0.4 if title else 0.0)
    assert size == (round(width * 100), round(height * 100))
    assert pixels.std() > 0
    assert paths[1].read_bytes()[:4] == b"%PDF"


def test_cluster_colours_are_consistent_across_panels(tmp_path):
    colors = cluster_colors(4)
    labels = np.array([[0, 1], [3, -1]])
    rgb = colorize_clusters(labels, colors)
    np.testing.assert_array_equal(rgb[0, 0], colors[0])
    np.testing.assert_array_equal(rgb[1, 0], colors[3])
    np.testing.assert_array_equal(rgb[1, 1], 0.0)
    # tab10 up to 10 clusters, so cluster 3 keeps its colour whether K is 4 or 10.
    np.testing.assert_array_equal(cluster_colors(10)[3], colors[3])
    assert len({tuple(c) for c in cluster_colors(20)}) == 20


def test_kmeans_figure_validates_rows(tmp_path):
    rng = np.random.default_rng(1)
    row = make_row(rng, "a")
    with pytest.raises(ConfigError, match="K = 3"):
        kmeans_figure([row], [3], tmp_path / "x", show_pca=False, show_gt=False, class_names=CLASS_NAMES)
    no_gt = FigureRow("b", row.image, row.cluster_maps)
    with pytest.raises(ConfigError, match="show_gt"):
        kmeans_figure([no_gt], [2], tmp_path / "x", show_pca=False, show_gt=True, class_names=CLASS_NAMES)
    with pytest.raises(ConfigError, match="show_pca"):
        kmeans_figure([no_gt], [2], tmp_path / "x", show_pca=True, show_gt=False, class_names=CLASS_NAMES)
    with pytest.raises(ConfigError, match="at least one row"):
        kmeans_figure([], [2], tmp_path / "x", show_pca=False, show_gt=False, class_names=CLASS_NAMES)
    assert not list(tmp_path.iterdir())


def test_confusion_figure(tmp_path):
    rng = np.random.default_rng(2)
    names = CLASS_NAMES[:5]
    matrix = rng.integers(0, 100, (5, 5))
    matrix[2] = 0  # a class absent from the ground truth
    path = confusion_figure(matrix, names, tmp_path / "cm.png")
    size, pixels = read_png(path)
    assert size[0] > 100
    assert size[1] > 100
    assert pixels.std() > 0
    norm = row_normalize(matrix)
    np.testing.assert_allclose(norm[[0, 1, 3, 4]].sum(axis=1), 1.0)
    np.testing.assert_allclose(norm[0], matrix[0] / matrix[0].sum())
    assert np.isnan(norm[2]).all()
    with pytest.raises(ConfigError, match="class names"):
        confusion_figure(matrix, CLASS_NAMES, tmp_path / "bad.png")


def test_curve_figure(tmp_path):
    steps = list(range(0, 200, 10))
    history = {"step": steps, "loss": [2.0 / (1 + s / 50) for s in steps], "lr": [1e-3 * (1 - s / 200) for s in steps]}
    path = curve_figure(history, tmp_path / "curves.png", dpi=100)
    size, pixels = read_png(path)
    assert size == (600, round((0.6 + 2 * 1.8) * 100))
    assert pixels.std() > 0
    with pytest.raises(ConfigError, match="no series"):
        curve_figure({"step": steps, "loss": []}, tmp_path / "empty.png")


def make_cam_row(image_id: str, classes: list[int], h: int = 24, w: int = 32, with_gt: bool = True) -> CamRow:
    rng = np.random.default_rng(len(classes))
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    cams = [
        (c, np.clip(1.0 - np.hypot(yy - h / 2, xx - (j + 1) * w / (len(classes) + 1)) / w, 0.0, 1.0))
        for j, c in enumerate(classes)
    ]
    mask = np.zeros((h, w), dtype=np.uint8)
    for c, cam in cams:
        mask[cam > 0.7] = c
    mask[(np.abs(yy - h / 2) < 2) & (mask == 0)] = 255  # unlabelled
    gt = np.where(mask == 255, 0, mask).astype(np.uint8) if with_gt else None
    return CamRow(image_id, image, cams, mask, gt=gt)


@pytest.mark.parametrize(("with_gt", "title"), [(True, "CAMs"), (False, None)])
def test_cam_figure_writes_png_and_pdf_with_rows_of_different_widths(tmp_path, with_gt, title):
    rows = [
        make_cam_row("one", [12], with_gt=with_gt),
        make_cam_row("three", [3, 8, 15], h=36, w=24, with_gt=with_gt),
        make_cam_row("none", [], with_gt=False),  # an image without CAMs: blank panels only
    ]
    png, pdf = cam_figure(rows, tmp_path / "sub" / "cam", class_names=CLASS_NAMES, threshold=0.5, title=title, dpi=100)
    assert (png.name, pdf.name) == ("cam.png", "cam.pdf")
    assert pdf.read_bytes()[:4] == b"%PDF"
    size, pixels = read_png(png)
    # Image | 3 CAM columns (the widest row) | pseudo-mask | ground truth when any row has one, plus
    # the legend; rows as high as the kmeans figure's (aspects 24/32, 36/24, 24/32).
    ncols = 1 + 3 + 1 + int(with_gt)
    height = 2 * (2.0 * 0.75 + 0.4) + (2.0 * 1.5 + 0.4) + (0.4 if title else 0.0)
    assert size == (round((ncols * 2.0 + 1.4) * 100), round(height * 100))
    assert pixels.std() > 0


def test_cam_figure_pads_short_rows_with_blank_panels(tmp_path):
    rows = [make_cam_row("a", [1, 2]), make_cam_row("b", [5])]
    one = cam_figure(rows[1:], tmp_path / "one", dpi=50)[0]
    two = cam_figure(rows, tmp_path / "two", dpi=50)[0]
    assert read_png(two)[0][0] - read_png(one)[0][0] == 2.0 * 50  # one more CAM column
    # Row b's second CAM column (centred at 3.5 panels from the left, in its row) is blank: all white.
    size, pixels = read_png(two)
    row_b = pixels[size[1] // 2 + 10 : size[1] - 10]
    blank = row_b[:, round(2.0 * 50 * 2) + 10 : round(2.0 * 50 * 3) - 10]
    assert blank.min() == 255.0


def test_cam_figure_validates_rows(tmp_path):
    good = make_cam_row("a", [12])
    cam = good.cams[0][1]
    cases = [
        (CamRow("a", good.image, [(12, cam[:-1])], good.mask), r"CAM of class 12 is \(23, 32\), not the image's \(24, 32\)"),
        (CamRow("a", good.image, [(12, cam * 3)], good.mask), r"CAM of class 12 must lie in \[0, 1\]"),
        (CamRow("a", good.image, good.cams, good.mask[:, :-1]), r"pseudo-mask is \(24, 31\)"),
        (CamRow("a", good.image, good.cams, good.mask, gt=good.mask.T), r"ground truth is \(32, 24\)"),
        (CamRow("a", good.image[..., 0], good.cams, good.mask), r"expected \(H, W, 3\)"),
    ]
    for row, message in cases:
        with pytest.raises(ConfigError, match=message):
            cam_figure([good, row], tmp_path / "x")
    with pytest.raises(ConfigError, match="at least one row"):
        cam_figure([], tmp_path / "x")
    assert not list(tmp_path.iterdir())
