"""Torch resampling along the canvas geometry: images onto the canvas, masks and logits back."""

import numpy as np
import torch
from PIL import Image

from pipeline.cache.geometry import fit_geometry, mask_to_canvas
from pipeline.resample import canvas_to_original, image_to_canvas


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
