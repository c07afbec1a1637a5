"""Cross-entropy at label resolution on logits predicted at patch resolution (the DINOv2 protocol).

The logits (B, K, h, w) are upsampled bilinearly (``align_corners=False``) to the labels' (H, W) and
compared with the labels, 255 = ignore. With sparse labels (scribbles, points) almost every upsampled
pixel is thrown away, so :func:`sparse_loss` evaluates the upsampling only at labelled pixels, with the
same 4-tap formula PyTorch uses; it equals :func:`dense_loss` to float rounding, value and gradient::

    loss = sparse_loss(logits, labels)             # == dense_loss(logits, labels), much cheaper
    px = labelled_pixels(labels[i])                # precompute once per image, then per batch:
    loss = samples_loss(logits, [px_0, px_1, ...], label_size=(S, S))
    share = loss_share(logits[4:8], labels, slice(4, 8), sparse=True)   # rows 4..7's part of a split batch

With no labelled pixel in the batch every loss here returns a zero that is still attached to the graph
(PyTorch's own mean over zero pixels would be NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.cache.geometry import IGNORE
from pipeline.errors import LabelError


class PixelSamples(NamedTuple):
    """Labelled pixels: four (N,) int64 tensors (batch item, row, column at label resolution, class)."""

    batch_idx: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    target: torch.Tensor


def _check_targets(target: torch.Tensor, num_classes: int) -> None:
    if target.numel() and int(target.max()) >= num_classes:
        raise LabelError(
            f"label value {int(target.max())} is not a class of a {num_classes}-class head "
            f"(expected 0..{num_classes - 1} or {IGNORE} = ignore)"
        )


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """A zero loss that keeps the graph (so ``backward()`` works on batches without labels)."""
    return logits.sum() * 0.0


def dense_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, K, h, w), labels (B, H, W) uint8/long, 255 = ignore -> mean CE over labelled pixels.

    The reference: upsample all logits to (H, W), then ``F.cross_entropy(ignore_index=255)``.
    """
    labels = labels.long()
    valid = labels[labels != IGNORE]
    if valid.numel() == 0:
        return _zero(logits)
    _check_targets(valid, logits.shape[1])
    up = F.interpolate(logits, size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels, ignore_index=IGNORE)


def labelled_pixels(labels: torch.Tensor) -> PixelSamples:
    """labels (B, H, W) or (H, W) uint8/long, 255 = ignore -> the labelled pixels, in raster order.

    For a single (H, W) image ``batch_idx`` is all zeros (see :func:`stack_samples`).
    """
    if labels.dim() == 2:
        labels = labels.unsqueeze(0)
    if labels.dim() != 3:
        raise LabelError(f"labels must be (B, H, W) or (H, W), got shape {tuple(labels.shape)}")
    b, y, x = torch.nonzero(labels != IGNORE, as_tuple=True)
    return PixelSamples(b, y, x, labels[b, y, x].long())


def stack_samples(per_image: Sequence[PixelSamples]) -> PixelSamples:
    """Per-image samples (each from one image) -> one batch; item ``i`` gets ``batch_idx = i``."""
    if not per_image:
        empty = torch.zeros(0, dtype=torch.long)
        return PixelSamples(empty, empty, empty, empty)
    batch = [torch.full_like(s.y, i) for i, s in enumerate(per_image)]
    return PixelSamples(torch.cat(batch), *(torch.cat([getattr(s, f) for s in per_image]) for f in ("y", "x", "target")))


def _source_taps(dst: torch.Tensor, in_size: int, out_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Destination indices (N,) -> (i0, i1, w0, w1): PyTorch's bilinear ``align_corners=False`` taps.

    As in ATen's ``area_pixel_compute_source_index``: src = (dst + 0.5) * in/out - 0.5, clamped at 0;
    i1 = i0 + 1 except at the last input index, where both taps read the edge value.
    """
    # ATen computes in the "opmath" type: float32 for float32/float16/bfloat16 logits, float64 for float64.
    op = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(in_size, dtype=op) / out_size
    src = ((dst.to(op) + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.long()  # truncation == floor, src >= 0
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = (src - i0).clamp(0.0, 1.0)
    return i0, i1, (1.0 - w1).to(dtype), w1.to(dtype)


def upsampled_at(
    logits: torch.Tensor,
    batch_idx: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    label_size: tuple[int, int],
) -> torch.Tensor:
    """logits (B, K, h, w) -> (N, K): the bilinear upsampling to ``label_size`` (H, W), evaluated only
    at pixels (batch_idx, y, x), each (N,). Equal to ``F.interpolate(logits, label_size, mode="bilinear",
    align_corners=False)[batch_idx, :, y, x]``. ``label_size`` is given, not guessed from the grid: the
    pixels per token are the backbone's patch size (14, 16, 8, ...), which the logits do not carry."""
    bsz, k, h, w = logits.shape
    out_h, out_w = label_size
    dev = logits.device
    batch_idx, y, x = batch_idx.to(dev), y.to(dev), x.to(dev)
    y0, y1, wy0, wy1 = _source_taps(y, h, out_h, logits.dtype)
    x0, x1, wx0, wx1 = _source_taps(x, w, out_w, logits.dtype)
    # Gather rows of a token-major copy: four (N, K) index_selects, whose backward is an index_add.
    flat = logits.permute(0, 2, 3, 1).reshape(bsz * h * w, k)
    base = batch_idx * (h * w)
    top = wx0[:, None] * flat.index_select(0, base + y0 * w + x0) + wx1[:, None] * flat.index_select(0, base + y0 * w + x1)
    bot = wx0[:, None] * flat.index_select(0, base + y1 * w + x0) + wx1[:, None] * flat.index_select(0, base + y1 * w + x1)
    return wy0[:, None] * top + wy1[:, None] * bot


def point_sampled_loss(
    logits: torch.Tensor,
    coords: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    targets: torch.Tensor,
    label_size: tuple[int, int],
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE of the upsampled logits at given pixels.

    logits (B, K, h, w); coords = (batch_idx, y, x), each (N,) int at label resolution ``label_size``
    (H, W), e.g. the (S, S) canvas; targets (N,) class ids (no 255). Mean over the N pixels, or, with
    ``weights`` (N,), ``sum(weights * ce)``.
    """
    targets = targets.to(logits.device).long()
    if targets.numel() == 0:
        return _zero(logits)
    _check_targets(targets, logits.shape[1])
    picked = upsampled_at(logits, *coords, label_size=label_size)
    if weights is None:
        return F.cross_entropy(picked, targets)
    ce = F.cross_entropy(picked, targets, reduction="none")
    return (ce * weights.to(ce.device, ce.dtype)).sum()


def samples_loss(
    logits: torch.Tensor, samples: PixelSamples | Sequence[PixelSamples], label_size: tuple[int, int]
) -> torch.Tensor:
    """:func:`point_sampled_loss` on precomputed samples: one batch, or a list with one entry per batch
    item (as :func:`labelled_pixels` gives for single images, precomputed once per image)."""
    if not isinstance(samples, PixelSamples):
        samples = stack_samples(samples)
    return point_sampled_loss(logits, (samples.batch_idx, samples.y, samples.x), samples.target, label_size)


def sparse_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, K, h, w), labels (B, H, W), 255 = ignore -> the same value as :func:`dense_loss`,
    computing the upsampled logits only at labelled pixels."""
    return samples_loss(logits, labelled_pixels(labels), label_size=(labels.shape[-2], labels.shape[-1]))


def subsampled_dense_loss(
    logits: torch.Tensor, labels: torch.Tensor, n_pixels: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """An unbiased estimate of :func:`dense_loss` from at most ``n_pixels`` labelled pixels per image.

    Image i with N_i labelled pixels keeps all of them when N_i <= n_pixels, else n_pixels drawn
    uniformly with replacement; each kept pixel is weighted N_i / (n_i * sum N), so the expectation is
    the mean over all labelled pixels, and with ``n_pixels >= N_i`` for every image it equals
    :func:`dense_loss` exactly. Drawing with replacement costs O(n_pixels) per image, where a
    without-replacement draw (a permutation) would cost O(N_i) every step. ``generator`` is a CPU
    generator.
    """
    picked = subsample_pixels(labels, n_pixels, generator)
    if picked is None:
        return _zero(logits)
    bi, px, weights = picked
    h_out, w_out = labels.shape[-2:]
    coords = (bi, px // w_out, px % w_out)
    flat = labels.reshape(labels.shape[0], -1)
    return point_sampled_loss(logits, coords, flat[bi, px].long(), (h_out, w_out), weights=weights)


def subsample_pixels(
    labels: torch.Tensor, n_pixels: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The pixels :func:`subsampled_dense_loss` trains on, drawn from ``generator`` image by image:
    (batch item (N,), flat pixel index (N,) into the (H * W) label map, weight (N,) float64), or None
    when the batch ``labels`` (B, H, W) has no labelled pixel."""
    if n_pixels <= 0:
        raise ValueError(f"n_pixels must be positive, got {n_pixels}")
    labelled = labels.reshape(labels.shape[0], -1) != IGNORE
    counts = labelled.sum(dim=1).tolist()
    total = sum(counts)
    if total == 0:
        return None
    batch_idx, pixel, weights = [], [], []
    for i, n_i in enumerate(counts):
        if n_i == 0:
            continue
        idx = labelled[i].nonzero().squeeze(1)
        if n_i > n_pixels:
            idx = idx[torch.randint(n_i, (n_pixels,), generator=generator).to(idx.device)]
        batch_idx.append(torch.full_like(idx, i))
        pixel.append(idx)
        weights.append(torch.full((idx.numel(),), n_i / (idx.numel() * total), dtype=torch.float64))
    return torch.cat(batch_idx), torch.cat(pixel), torch.cat(weights)


def loss_share(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rows: slice,
    *,
    sparse: bool,
    pixels: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The part of a batch's loss that rows ``rows`` of it make, for a batch split over processes.

    labels (B, H, W) of the whole batch, 255 = ignore; logits (b, K, h, w) of its rows ``rows`` only.
    Every pixel keeps the weight it has in the loss of the whole batch: 1 / (labelled pixels of the
    whole batch), or with ``pixels`` (dense labels) the weights of :func:`subsample_pixels`, drawn for
    the whole batch so that every process makes the draws one process would. The shares of all rows
    add up to :func:`dense_loss` (= :func:`sparse_loss`), or :func:`subsampled_dense_loss`, of the
    whole batch, to float rounding. Labels are checked for the whole batch, so every process fails alike.
    """
    size = (labels.shape[-2], labels.shape[-1])
    flat = labels.reshape(labels.shape[0], -1)
    labelled = flat != IGNORE
    _check_targets(flat[labelled], logits.shape[1])
    total = int(labelled.sum())
    if total == 0:
        return _zero(logits)
    if pixels is not None and not sparse:
        picked = subsample_pixels(labels, pixels, generator)
        if picked is None:
            return _zero(logits)
        bi, px, weights = picked
        keep = (bi >= rows.start) & (bi < rows.stop)
        bi, px, weights = bi[keep], px[keep], weights[keep]
    elif sparse:
        bi, px = torch.nonzero(labelled[rows], as_tuple=True)
        bi = bi + rows.start
        weights = torch.full((len(bi),), 1.0 / total, dtype=torch.float64)
    else:  # dense: upsample every logit, as dense_loss does
        up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return F.cross_entropy(up, labels[rows].long(), ignore_index=IGNORE, reduction="sum") / total
    coords = (bi - rows.start, px // size[1], px % size[1])
    return point_sampled_loss(logits, coords, flat[bi, px].long(), size, weights=weights)
