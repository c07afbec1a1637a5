from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.voc import CLASS_NAMES
from pipeline.errors import ConfigError
from pipeline.figures import predictions
from pipeline.figures.predictions import WorstRow, legend_entries, overlay, worst_figure

# VOC devkit colours, written out so the tests do not lean on palette().
PERSON = (192, 128, 128)  # class 15
BIRD = (128, 128, 0)  # class 3
AEROPLANE = (128, 0, 0)  # class 1
VOID = (224, 224, 192)  # 255


def make_pred(h: int = 8, w: int = 10) -> np.ndarray:
    pred = np.zeros((h, w), dtype=np.uint8)
    pred[:, w // 2 :] = 15
    pred[0, 0] = 255
    pred[h - 1, 0] = 3
    return pred


def colours(pixels: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_overlay_blends_every_class_but_background(alpha):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    pred = make_pred()
    out = np.asarray(overlay(image, pred, CLASS_NAMES, alpha=alpha))
    assert out.shape[0] > 8  # the legend band below
    assert out.shape[1] >= 10
    top = out[:8, :10]
    # Background (class 0) is never tinted.
    np.testing.assert_array_equal(top[pred == 0], image[pred == 0])
    # Other classes and void: round((1 - alpha) * image + alpha * colour), channel by channel.
    for (y, x), colour in [((3, 7), PERSON), ((7, 0), BIRD), ((0, 0), VOID)]:
        expected = [round((1 - alpha) * int(image[y, x, k]) + alpha * colour[k]) for k in range(3)]
        assert top[y, x].tolist() == expected, (y, x)
    if alpha == 0.0:
        np.testing.assert_array_equal(top, image)
    if alpha == 1.0:
        assert colours(top[pred == 15]) == {PERSON}


def test_legend_entries_list_exactly_the_classes_present():
    assert legend_entries(make_pred(), CLASS_NAMES) == [(0, "background"), (3, "bird"), (15, "person"), (255, "void")]
    assert legend_entries(np.full((2, 2), 7, dtype=np.uint8), CLASS_NAMES) == [(7, "car")]
    # Ids without a name are shown as numbers.
    assert legend_entries(np.array([[1, 30]], dtype=np.uint8), CLASS_NAMES[:2]) == [(1, "aeroplane"), (30, "30")]


def test_overlay_legend_band_shows_the_present_classes_swatches():
    image = np.full((40, 200, 3), 100, dtype=np.uint8)
    pred = make_pred(40, 200)
    out = overlay(image, pred, CLASS_NAMES)
    band = np.asarray(out)[40:]
    assert band.shape[0] > 0
    found = colours(band)
    assert {PERSON, BIRD, VOID} <= found
    assert AEROPLANE not in found  # absent from pred, so not in the legend


def test_overlay_legend_wraps_below_a_narrow_image():
    image = np.zeros((16, 24, 3), dtype=np.uint8)
    one = overlay(image, np.full((16, 24), 15, dtype=np.uint8), CLASS_NAMES)
    three = overlay(image, make_pred(16, 24), CLASS_NAMES)
    assert one.height > 16
    assert three.height > one.height  # more entries, more lines
    # The image area is kept unscaled at the top left: the canvas only grows.
    assert one.width >= 24
    np.testing.assert_array_equal(np.asarray(three)[1:15, :12], 0)  # background, untinted


def test_overlay_validates_its_inputs():
    image = np.zeros((8, 10, 3), dtype=np.uint8)
    with pytest.raises(ConfigError, match=r"prediction is \(10, 8\) but the image is \(8, 10, 3\)"):
        overlay(image, make_pred().T, CLASS_NAMES)
    with pytest.raises(ConfigError, match=r"expected an \(H, W, 3\) uint8 image"):
        overlay(image[..., 0], make_pred(), CLASS_NAMES)
    with pytest.raises(ConfigError, match="uint8 image"):
        overlay(image.astype(np.float32), make_pred(), CLASS_NAMES)
    with pytest.raises(ConfigError, match=r"class ids in \[0, 255\]"):
        overlay(image, make_pred().astype(np.int16) + 250, CLASS_NAMES)
    with pytest.raises(ConfigError, match="alpha"):
        overlay(image, make_pred(), CLASS_NAMES, alpha=1.5)


def make_worst_row(image_id: str, h: int = 24, w: int = 32, iou: float | None = 0.25) -> WorstRow:
    rng = np.random.default_rng(h * w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gt = make_pred(h, w)
    pred = gt.copy()
    pred[: h // 2] = 8
    return WorstRow(image_id, image, gt, pred, iou)


def read_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size, np.asarray(im.convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize(("n_rows", "title"), [(1, None), (3, "worst images")])
def test_worst_figure_writes_a_png(tmp_path, monkeypatch, n_rows, title):
    titles: list[str] = []
    legends: list[set[int]] = []
    show, legend = predictions._show, predictions._legend

    def spy_show(ax, rgb, text):
        titles.append(text)
        show(ax, rgb, text)

    def spy_legend(ax, masks, names, void):
        legends.append(set(np.unique(masks).tolist()))
        legend(ax, masks, names, void)

    monkeypatch.setattr(predictions, "_show", spy_show)
    monkeypatch.setattr(predictions, "_legend", spy_legend)
    rows = [make_worst_row("a"), make_worst_row("b", h=36, w=24, iou=None), make_worst_row("c", iou=0.031)][:n_rows]
    path = worst_figure(rows, tmp_path / "sub" / "worst.png", title=title, dpi=100)
    assert path == tmp_path / "sub" / "worst.png"
    size, pixels = read_png(path)
    # Documented layout, as kmeans_figure: 3 panels of 2 inches and a 1.4-inch legend; rows 2 inches
    # times their aspect (24/32, 36/24, 24/32) plus 0.4 inch of title each.
    heights = [2.0 * 0.75 + 0.4, 2.0 * 1.5 + 0.4, 2.0 * 0.75 + 0.4][:n_rows]
    assert size == (round((3 * 2.0 + 1.4) * 100), round((sum(heights) + (0.4 if title else 0.0)) * 100))
    assert pixels.std() > 0
    # The ground truth's person colour is drawn (the panels use the VOC palette).
    assert PERSON in colours(pixels.astype(np.uint8))
    # Each row: image titled with its id and IoU in %, ground truth, prediction; one legend of the
    # classes in both masks.
    expected = [["a  IoU 25.0 %", "ground truth", "prediction"], ["b", "ground truth", "prediction"]]
    expected += [["c  IoU 3.1 %", "ground truth", "prediction"]]
    assert titles == [t for row in expected[:n_rows] for t in row]
    assert legends == [{0, 3, 8, 15, 255}] * n_rows


def test_worst_figure_validates_rows(tmp_path):
    good = make_worst_row("a")
    cases = [
        (WorstRow("b", good.image, good.gt[:-1], good.pred), r"image b: ground truth is \(23, 32\), not the image's \(24, 32\)"),
        (WorstRow("c", good.image, good.gt, good.pred.T), r"image c: prediction is \(32, 24\), not the image's \(24, 32\)"),
        (WorstRow("d", good.image[..., 0], good.gt, good.pred), r"image d: expected \(H, W, 3\)"),
    ]
    for row, message in cases:
        with pytest.raises(ConfigError, match=message):
            worst_figure([good, row], tmp_path / "x.png")
    with pytest.raises(ConfigError, match="at least one row"):
        worst_figure([], tmp_path / "x.png")
    with pytest.raises(ConfigError, match="PNG only"):
        worst_figure([good], tmp_path / "x.pdf")
    assert not list(tmp_path.iterdir())
