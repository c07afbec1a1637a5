"""Losses: the sparse path equals full upsampling + masked CE, in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import LabelError
from pipeline.training.losses import (
    PixelSamples,
    dense_loss,
    labelled_pixels,
    point_sampled_loss,
    samples_loss,
    sparse_loss,
    stack_samples,
    subsampled_dense_loss,
    upsampled_at,
)

IGNORE = 255


def make_logits(b: int, k: int, h: int, w: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(b, k, h, w, generator=g)).to(dtype).requires_grad_(True)


def sparse_labels(b: int, out_h: int, out_w: int, k: int, frac: float, seed: int = 0) -> torch.Tensor:
    """Random labels on a fraction of pixels, plus every border pixel and the four corners labelled."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((b, out_h, out_w), IGNORE, dtype=torch.uint8)
    keep = torch.rand(b, out_h, out_w, generator=g) < frac
    cls = torch.randint(0, k, (b, out_h, out_w), generator=g, dtype=torch.uint8)
    labels[keep] = cls[keep]
    border = torch.zeros(out_h, out_w, dtype=torch.bool)
    border[[0, 1, -2, -1], :] = True
    border[:, [0, 1, -2, -1]] = True
    labels[:, border] = cls[:, border]
    labels[:, [0, 0, -1, -1], [0, -1, 0, -1]] = k - 1  # the last class at the corners
    return labels


def grad_of(loss_fn, logits: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    logits.grad = None
    loss = loss_fn(logits, *args)
    loss.backward()
    return loss.detach(), logits.grad.clone()


@pytest.mark.parametrize(
    ("b", "k", "h", "w", "out_h", "out_w"),
    [
        (3, 4, 4, 4, 56, 56),  # the canvas case S = 14 h
        (2, 5, 3, 5, 42, 70),  # non-square grid
        (2, 3, 5, 4, 37, 23),  # scale factors that are not integers
        (1, 6, 6, 7, 6, 7),  # same resolution
        (2, 3, 8, 6, 5, 4),  # downsampling
    ],
)
def test_upsampled_at_equals_interpolate_everywhere(b: int, k: int, h: int, w: int, out_h: int, out_w: int) -> None:
    logits = make_logits(b, k, h, w).detach()
    full = F.interpolate(logits, size=(out_h, out_w), mode="bilinear", align_corners=False)
    bi, y, x = torch.meshgrid(torch.arange(b), torch.arange(out_h), torch.arange(out_w), indexing="ij")
    picked = upsampled_at(logits, bi.flatten(), y.flatten(), x.flatten(), label_size=(out_h, out_w))
    torch.testing.assert_close(picked, full.permute(0, 2, 3, 1).reshape(-1, k), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("patch", [14, 16, 8])
def test_upsampled_at_float32_on_the_canvas_of_any_patch(patch: int) -> None:
    logits = make_logits(2, 21, 4, 4, dtype=torch.float32).detach()
    s = 4 * patch  # the canvas of a 4 x 4 grid
    full = F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False)
    px = labelled_pixels(sparse_labels(2, s, s, 21, 0.1))
    picked = upsampled_at(logits, px.batch_idx, px.y, px.x, label_size=(s, s))
    torch.testing.assert_close(picked, full[px.batch_idx, :, px.y, px.x], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("h", "w", "out_h", "out_w"), [(4, 4, 56, 56), (3, 5, 42, 70), (5, 4, 37, 23)])
@pytest.mark.parametrize("frac", [0.002, 0.05, 1.0])
def test_sparse_equals_dense_value_and_gradient(h: int, w: int, out_h: int, out_w: int, frac: float) -> None:
    k = 5
    logits = make_logits(3, k, h, w, seed=1)
    labels = sparse_labels(3, out_h, out_w, k, frac, seed=2)
    dense, g_dense = grad_of(dense_loss, logits, labels)
    sparse, g_sparse = grad_of(sparse_loss, logits, labels)
    reference = F.cross_entropy(
        F.interpolate(logits.detach(), size=(out_h, out_w), mode="bilinear", align_corners=False),
        labels.long(),
        ignore_index=IGNORE,
    )
    torch.testing.assert_close(dense, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-9, atol=1e-12)
    assert g_dense.abs().sum() > 0


def test_sparse_equals_dense_float32_labels_long() -> None:
    logits = make_logits(4, 21, 8, 8, dtype=torch.float32)
    labels = sparse_labels(4, 112, 112, 21, 0.02).long()
    dense, g_dense = grad_of(dense_loss, logits, labels)
    sparse, g_sparse = grad_of(sparse_loss, logits, labels)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-7)


def test_one_labelled_pixel_per_corner_image() -> None:
    """Each image has a single label in a different corner: only that corner's patch gets a gradient."""
    logits = make_logits(4, 3, 4, 5)
    labels = torch.full((4, 56, 70), IGNORE, dtype=torch.uint8)
    for i, (y, x) in enumerate([(0, 0), (0, 69), (55, 0), (55, 69)]):
        labels[i, y, x] = 2
    dense, g_dense = grad_of(dense_loss, logits, labels)
    sparse, g_sparse = grad_of(sparse_loss, logits, labels)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-12, atol=1e-15)
    touched = g_sparse.abs().sum(dim=1) > 0  # (B, h, w)
    assert touched.sum() == 4
    assert touched[0, 0, 0]
    assert touched[1, 0, 4]
    assert touched[2, 3, 0]
    assert touched[3, 3, 4]


def test_precomputed_per_image_samples() -> None:
    logits = make_logits(3, 4, 4, 4)
    labels = sparse_labels(3, 56, 56, 4, 0.03)
    per_image = [labelled_pixels(labels[i]) for i in range(3)]
    assert all((p.batch_idx == 0).all() for p in per_image)
    stacked = stack_samples(per_image)
    whole = labelled_pixels(labels)
    for a, b in zip(stacked, whole, strict=True):
        assert torch.equal(a, b)
    expected = dense_loss(logits, labels)
    torch.testing.assert_close(samples_loss(logits, per_image, (56, 56)), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(samples_loss(logits, stacked, label_size=(56, 56)), expected, rtol=1e-12, atol=0)
    coords = (stacked.batch_idx, stacked.y, stacked.x)
    torch.testing.assert_close(point_sampled_loss(logits, coords, stacked.target, (56, 56)), expected, rtol=1e-12, atol=0)


def test_labelled_pixels_matches_mask() -> None:
    labels = sparse_labels(2, 28, 42, 7, 0.1)
    px = labelled_pixels(labels)
    assert isinstance(px, PixelSamples)
    assert px.y.numel() == int((labels != IGNORE).sum())
    assert torch.equal(px.target, labels[px.batch_idx, px.y, px.x].long())
    assert (px.target != IGNORE).all()
    with pytest.raises(LabelError):
        labelled_pixels(labels[None])


def test_no_labelled_pixel_gives_attached_zero() -> None:
    logits = make_logits(2, 3, 4, 4)
    labels = torch.full((2, 56, 56), IGNORE, dtype=torch.uint8)
    for fn in (dense_loss, sparse_loss):
        loss = fn(logits, labels)
        assert loss.item() == 0.0
        loss.backward()
        assert (logits.grad == 0).all()
    assert subsampled_dense_loss(logits, labels, 10).item() == 0.0


def test_label_out_of_range() -> None:
    logits = make_logits(1, 3, 4, 4)
    labels = torch.full((1, 56, 56), IGNORE, dtype=torch.uint8)
    labels[0, 3, 3] = 3
    with pytest.raises(LabelError, match="label value 3"):
        sparse_loss(logits, labels)
    with pytest.raises(LabelError, match="label value 3"):
        dense_loss(logits, labels)


def test_subsampled_with_enough_pixels_equals_dense() -> None:
    logits = make_logits(3, 5, 4, 4)
    labels = sparse_labels(3, 56, 56, 5, 0.3)
    labels[1, :40] = IGNORE  # images with different numbers of labelled pixels
    n_max = int((labels != IGNORE).sum(dim=(1, 2)).max())
    dense, g_dense = grad_of(dense_loss, logits, labels)
    sub, g_sub = grad_of(subsampled_dense_loss, logits, labels, n_max, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sub, dense, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_sub, g_dense, rtol=1e-9, atol=1e-13)


def test_subsampled_keeps_n_per_image_and_is_unbiased() -> None:
    logits = make_logits(3, 5, 4, 4).detach()
    labels = sparse_labels(3, 28, 28, 5, 1.0)
    labels[0, :21] = IGNORE  # 7 x 28 = 196 labelled pixels in image 0, 784 in the others
    n = 20
    full = F.interpolate(logits, size=(28, 28), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(full, labels.long(), ignore_index=IGNORE, reduction="none")
    dense = dense_loss(logits, labels)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([subsampled_dense_loss(logits, labels, n, g) for _ in range(300)])
    # The estimator's exact standard error follows from the per-image variance of the per-pixel loss
    # (n draws with replacement per image).
    total = int((labels != IGNORE).sum())
    var = 0.0
    for i in range(3):
        li = per_pixel[i][labels[i] != IGNORE]
        ni = li.numel()
        var += (ni / total) ** 2 * li.var(correction=0).item() / n
    stderr = (var / len(draws)) ** 0.5
    assert abs(draws.mean().item() - dense.item()) < 4 * stderr
    assert draws.std().item() > 0  # it really samples
    # A per-image unweighted mean would be biased towards image 0 (fewer pixels): not what we compute.
    biased = torch.stack([per_pixel[i][labels[i] != IGNORE].mean() for i in range(3)]).mean()
    assert abs(biased.item() - dense.item()) > 10 * stderr


def test_subsampled_one_pixel_per_image() -> None:
    """With n_pixels=1 the loss is sum_i (N_i / N) * ce(one pixel of image i): find that pixel pair."""
    logits = make_logits(2, 3, 4, 4).detach()
    labels = sparse_labels(2, 56, 56, 3, 0.05, seed=3)
    labels[1, :20] = IGNORE
    full = F.interpolate(logits, size=(56, 56), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(full, labels.long(), ignore_index=IGNORE, reduction="none")
    losses = [per_pixel[i][labels[i] != IGNORE] for i in range(2)]
    total = sum(v.numel() for v in losses)
    w0, w1 = (v.numel() / total for v in losses)
    for seed in range(5):
        loss = subsampled_dense_loss(logits, labels, 1, torch.Generator().manual_seed(seed))
        combos = w0 * losses[0][:, None] + w1 * losses[1][None, :]
        assert (combos - loss).abs().min() < 1e-12
    with pytest.raises(ValueError, match="n_pixels"):
        subsampled_dense_loss(logits, labels, 0)
