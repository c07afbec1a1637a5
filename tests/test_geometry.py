import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cache.geometry import Geometry, fit_geometry, mask_to_canvas, points_to_canvas
from pipeline.errors import ConfigError
from pipeline.resample import canvas_to_original, image_to_canvas


@pytest.mark.parametrize(("h", "w"), [(375, 500), (500, 333), (448, 448), (17, 230), (1, 1)])
def test_fit_geometry_longer_side_fills_canvas_centred(h, w):
    g = fit_geometry(h, w, 448)
    assert max(g.resized_height, g.resized_width) == 448
    assert abs(g.resized_height / g.resized_width - h / w) < 2 / min(g.resized_height, g.resized_width) + 1e-9
    assert g.pad_top + g.resized_height + g.pad_top in (448, 447)
    assert g.pad_left + g.resized_width + g.pad_left in (448, 447)
    assert Geometry.from_row(g.to_row(), 448) == g


def test_size_must_be_multiple_of_patch():
    with pytest.raises(ConfigError, match="multiple of 14"):
        fit_geometry(10, 10, 450)


def test_content_mask_grid_marks_patches_touching_content():
    g = fit_geometry(100, 300, 56)  # content 19 x 56 rows 18..37 -> patches 1 and 2 of 4
    grid = g.content_mask(grid=4)
    assert grid.shape == (4, 4)
    np.testing.assert_array_equal(grid.any(axis=1), [False, True, True, False])
    assert grid.all(axis=0).sum() == 0
    assert grid.any(axis=0).all()


def test_mask_round_trip_back_to_original_resolution():
    rng = np.random.default_rng(0)
    mask = np.kron(rng.integers(0, 21, (15, 20)), np.ones((25, 25), dtype=np.int64)).astype(np.uint8)  # 375 x 500
    g = fit_geometry(*mask.shape, 448)
    canvas = mask_to_canvas(mask, g)
    assert (canvas[: g.pad_top] == 255).all()
    assert (canvas[g.pad_top + g.resized_height :] == 255).all()
    # A "prediction" made on the canvas: one-hot scores, mapped back as logits would be.
    onehot = torch.nn.functional.one_hot(torch.from_numpy(np.where(canvas == 255, 0, canvas)).long(), 21)
    back = canvas_to_original(onehot.permute(2, 0, 1).float(), g).argmax(0).numpy()
    assert back.shape == mask.shape
    assert (back == mask).mean() > 0.98
    nearest = canvas_to_original(torch.from_numpy(canvas), g, mode="nearest").numpy()
    assert (nearest == mask).mean() > 0.99


def test_patch_grid_logits_map_back_to_original():
    g = fit_geometry(90, 150, 112)  # grid 8 x 8
    logits = torch.randn(3, 8, 8)
    out = canvas_to_original(logits, g)
    assert out.shape == (3, 90, 150)
    assert torch.isfinite(out).all()


def test_image_to_canvas_pads_with_zero_after_normalisation():
    img = Image.fromarray(np.full((30, 60, 3), 200, dtype=np.uint8))
    g = fit_geometry(30, 60, 56)
    x = image_to_canvas(img, g, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (3, 56, 56)
    assert torch.all(x[:, : g.pad_top] == 0)
    inside = x[:, g.pad_top : g.pad_top + g.resized_height, :]
    torch.testing.assert_close(inside, torch.full_like(inside, (200 / 255 - 0.5) / 0.25))


def test_points_map_with_the_resize():
    g = fit_geometry(100, 200, 56)  # scale 0.28, content 28 x 56 at rows 14..41
    xy = points_to_canvas(np.array([[0.0, 0.0], [199.0, 99.0], [100.0, 50.0]]), g)
    assert xy[0, 0] == pytest.approx(0.5 * 0.28 - 0.5)
    assert xy[0, 1] == pytest.approx(14 + 0.5 * 0.28 - 0.5)
    assert xy[1, 0] == pytest.approx(55.5 - 0.14)
    assert xy[1, 1] == pytest.approx(14 + 27.5 - 0.14)
    assert (np.round(xy[2]) == [28, 28]).all()
