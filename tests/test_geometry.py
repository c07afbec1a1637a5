"""The canvas geometry, numpy only: where an image sits on the square canvas, masks and points onto it."""

import numpy as np
import pytest

from pipeline.cache.geometry import Geometry, check_size, fit_geometry, points_to_canvas
from pipeline.errors import ConfigError


@pytest.mark.parametrize(("h", "w"), [(375, 500), (500, 333), (448, 448), (17, 230), (1, 1)])
def test_fit_geometry_longer_side_fills_canvas_centred(h, w):
    g = fit_geometry(h, w, 448)
    assert max(g.resized_height, g.resized_width) == 448
    assert abs(g.resized_height / g.resized_width - h / w) < 2 / min(g.resized_height, g.resized_width) + 1e-9
    assert g.pad_top + g.resized_height + g.pad_top in (448, 447)
    assert g.pad_left + g.resized_width + g.pad_left in (448, 447)
    assert Geometry.from_row(g.to_row(), 448) == g


@pytest.mark.parametrize(("size", "patch"), [(448, 14), (448, 16), (64, 16), (64, 8), (224, 14)])
def test_sizes_that_are_multiples_of_the_patch_pass(size, patch):
    assert check_size(size, patch, "m") == size


@pytest.mark.parametrize(("size", "patch", "near"), [(450, 14, 448), (56, 16, 64), (70, 16, 64), (0, 8, 8), (10, 14, 14)])
def test_size_must_be_multiple_of_patch_in_one_line(size, patch, near):
    with pytest.raises(ConfigError, match=f"^size must be a multiple of the patch size {patch} of m, got {size}") as info:
        check_size(size, patch, "m")
    assert str(info.value).endswith(f"(try {near})")
    assert "\n" not in str(info.value)


def test_geometry_takes_any_positive_size():
    assert fit_geometry(10, 10, 450).canvas == 450  # the canvas does not know the patch; check_size does
    with pytest.raises(ConfigError, match="positive"):
        fit_geometry(10, 10, 0)


def test_content_mask_grid_marks_patches_touching_content():
    g = fit_geometry(100, 300, 56)  # content 19 x 56 rows 18..37 -> patches 1 and 2 of 4
    grid = g.content_mask(grid=4)
    assert grid.shape == (4, 4)
    np.testing.assert_array_equal(grid.any(axis=1), [False, True, True, False])
    assert grid.all(axis=0).sum() == 0
    assert grid.any(axis=0).all()


def test_content_mask_at_patch_16():
    g = fit_geometry(30, 64, 64)  # content 30 x 64 at rows 17..46 -> patch rows 1 (16..31) and 2 (32..47) of 4
    grid = g.content_mask(grid=4)
    np.testing.assert_array_equal(grid.any(axis=1), [False, True, True, False])
    assert grid.any(axis=0).all()
    pixels = g.content_mask()
    np.testing.assert_array_equal(grid, pixels.reshape(4, 16, 4, 16).any(axis=(1, 3)))


def test_points_map_with_the_resize():
    g = fit_geometry(100, 200, 56)  # scale 0.28, content 28 x 56 at rows 14..41
    xy = points_to_canvas(np.array([[0.0, 0.0], [199.0, 99.0], [100.0, 50.0]]), g)
    assert xy[0, 0] == pytest.approx(0.5 * 0.28 - 0.5)
    assert xy[0, 1] == pytest.approx(14 + 0.5 * 0.28 - 0.5)
    assert xy[1, 0] == pytest.approx(55.5 - 0.14)
    assert xy[1, 1] == pytest.approx(14 + 27.5 - 0.14)
    assert (np.round(xy[2]) == [28, 28]).all()
