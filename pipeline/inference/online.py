"""Protocol inference: the frozen backbone runs online over images, and many heads share its tokens.

Usage::

    predictor = OnlinePredictor(backbone, [(head_a, (23,)), (head_b, (20, 21, 22, 23))], PROTOCOLS["lin"], device)
    for out in predictor.run(items):          # in item order
        out.probs[0]                          # (K, H, W) float32 softmax of head_a at the original size

Decoding and rescaling run in DataLoader workers; windows of several images are batched through the
backbone under ``inference_mode`` and autocast, halving the batch on CUDA out-of-memory; nothing is
written. The backbone runs once per window for the union of the heads' layers, and each head reads
its own blocks' channels, so R heads cost one backbone pass plus R cheap head passes. The geometry
(scales, windows, padding, how logits are merged) is :mod:`pipeline.inference.protocols`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.devices import OomBackoff, autocast, pin_memory
from pipeline.errors import ConfigError, DataError
from pipeline.features.backbones import Backbone
from pipeline.features.data import ImageItem, load_rgb
from pipeline.heads import SegHead
from pipeline.inference.protocols import Protocol, centre_pad, rescaled_size, view_scale, window_boxes

log = logging.getLogger(__name__)

#: Called with (images done, images in all).
Progress = Callable[[int, int], None]


def rescale(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, h, w) uint8, bilinear without antialiasing and rounded to 8 bits, as
    mmcv's cv2 ``INTER_LINEAR`` resize (which may differ by one grey level where cv2 rounds its
    fixed-point weights)."""
    if tuple(image.shape[-2:]) == size:
        return image
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


class ProtocolImages(torch.utils.data.Dataset):
    """Item ``i`` -> (i, [one (3, h, w) uint8 view per ratio], (H, W), error); flips happen on the device."""

    def __init__(self, items: Sequence[ImageItem], protocol: Protocol):
        self.items, self.protocol = list(items), protocol

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor], tuple[int, int], str]:
        try:
            image = torch.from_numpy(np.array(load_rgb(self.items[index].path))).permute(2, 0, 1)
        except DataError as exc:
            return index, [], (0, 0), str(exc)
        h, w = image.shape[-2:]
        sizes = [rescaled_size(h, w, view_scale(self.protocol.scale, r)) for r in self.protocol.ratios]
        return index, [rescale(image, s) for s in sizes], (h, w), ""


@dataclass
class ImageProbs:
    """One image's result: class probabilities (K, H, W) per head, on the device (empty on error)."""

    index: int
    item: ImageItem
    size: tuple[int, int]
    probs: list[torch.Tensor]
    error: str = ""


@dataclass
class _Pending:
    """An image whose views are being run: the per-head probability sums at the original size."""

    index: int
    size: tuple[int, int]
    sums: list[torch.Tensor]
    views_left: int
    error: str = ""


class OnlinePredictor:
    """Runs ``protocol`` for several heads on one backbone (see the module docstring).

    ``heads`` pairs each head with the block indices its tokens come from (the run's layers); the
    head's input width must be ``backbone.hidden_size * len(layers)``.
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: Sequence[tuple[SegHead, Sequence[int]]],
        protocol: Protocol,
        device: torch.device,
        *,
        batch_size: int = 8,
        workers: int = 0,
    ):
        if not heads:
            raise ConfigError("no heads to evaluate")
        self.backbone, self.protocol, self.device, self.workers = backbone.to(device), protocol, device, workers
        self.layers = tuple(sorted({layer for _, layers in heads for layer in layers}))
        width = backbone.hidden_size
        self.heads: list[tuple[SegHead, torch.Tensor]] = []
        for head, layers in heads:
            if head.in_channels != width * len(layers):
                raise ConfigError(
                    f"a head reads {head.in_channels} channels but layers {list(layers)} of {backbone.spec.name} give "
                    f"{width * len(layers)}; was it trained on another backbone?"
                )
            index = torch.cat([torch.arange(width) + self.layers.index(layer) * width for layer in layers])
            self.heads.append((head.to(device).eval(), index.to(device)))
        self.batch_size = batch_size
        self.chunks = OomBackoff(batch_size)
        self.windows_run = 0

    def run(self, items: Sequence[ImageItem], progress: Progress | None = None) -> Iterator[ImageProbs]:
        """Probabilities for every item, in order; unreadable images come back with ``error`` set."""
        loader = torch.utils.data.DataLoader(
            ProtocolImages(items, self.protocol), batch_size=None, num_workers=self.workers,
            pin_memory=pin_memory(self.device), prefetch_factor=2 if self.workers else None,
        )  # fmt: skip
        queue: list[tuple[_Pending, torch.Tensor, bool]] = []  # (image, view pixels, flipped)
        pending: dict[int, _Pending] = {}
        done = 0
        for index, views, size, error in loader:
            image = _Pending(index, (int(size[0]), int(size[1])), [], 0 if error else len(self.protocol.views), error)
            pending[index] = image
            for view in views:
                pixels = self._normalise(view)
                queue += [(image, pixels, False)] + ([(image, pixels, True)] if self.protocol.flip else [])
            if sum(len(self._boxes(p)) for _, p, _ in queue) >= self.batch_size:
                self._run_views(queue)
                queue = []
            for finished in self._finished(pending):
                done += 1
                yield self._result(finished, items)
                if progress:
                    progress(done, len(items))
        self._run_views(queue)
        for finished in self._finished(pending):
            done += 1
            yield self._result(finished, items)
            if progress:
                progress(done, len(items))

    def _normalise(self, view: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.backbone.mean, device=self.device).view(3, 1, 1)
        std = torch.tensor(self.backbone.std, device=self.device).view(3, 1, 1)
        return (view.to(self.device, non_blocking=True).float() / 255.0 - mean) / std

    def _boxes(self, pixels: torch.Tensor) -> list[tuple[int, int, int, int]]:
        return window_boxes(pixels.shape[-2], pixels.shape[-1], self.protocol.crop, self.protocol.stride)

    @staticmethod
    def _finished(pending: dict[int, _Pending]) -> list[_Pending]:
        ready = []
        for index in sorted(pending):
            if pending[index].views_left:
                break  # keep item order
            ready.append(pending.pop(index))
        return ready

    def _result(self, image: _Pending, items: Sequence[ImageItem]) -> ImageProbs:
        n = len(self.protocol.views)
        return ImageProbs(image.index, items[image.index], image.size, [s / n for s in image.sums], image.error)

    def _run_views(self, queue: list[tuple[_Pending, torch.Tensor, bool]]) -> None:
        """Forward every window of the queued views (batched by window shape), then merge per view."""
        jobs: list[tuple[int, tuple[int, int, int, int], torch.Tensor]] = []
        for v, (_, pixels, flipped) in enumerate(queue):
            x = pixels.flip(-1) if flipped else pixels
            for box in self._boxes(x):
                y1, y2, x1, x2 = box
                jobs.append((v, box, centre_pad(x[:, y1:y2, x1:x2], self.backbone.patch_size)))
        tokens: list[torch.Tensor | None] = [None] * len(jobs)
        shapes: dict[tuple[int, ...], list[int]] = {}
        for j, (_, _, window) in enumerate(jobs):
            shapes.setdefault(tuple(window.shape), []).append(j)
        for members in shapes.values():
            out = torch.cat(self.chunks(self._forward, torch.stack([jobs[j][2] for j in members])))
            for j, t in zip(members, out, strict=True):
                tokens[j] = t
        for v, (image, pixels, flipped) in enumerate(queue):
            mine = [(jobs[j][1], tokens[j]) for j in range(len(jobs)) if jobs[j][0] == v]
            self._merge_view(image, (pixels.shape[-2], pixels.shape[-1]), mine, flipped)

    def _forward(self, windows: torch.Tensor) -> torch.Tensor:
        self.windows_run += len(windows)
        with torch.inference_mode(), autocast(self.device):
            return self.backbone(windows, self.layers)[0]

    def _merge_view(self, image: _Pending, shape: tuple[int, int], windows: list[Any], flipped: bool) -> None:
        """Slide-inference merge of one view for every head, added to the image's probability sums.

        The heads' logits are stacked on the class axis and merged and resized together: every step is
        per channel, so this equals merging each head alone, at a fraction of the per-head overhead."""
        boxes = [box for box, _ in windows]
        tokens = torch.stack([t for _, t in windows])
        with torch.inference_mode():
            logits = [head(tokens.index_select(-1, index)).float() for head, index in self.heads]
        merged = merge_windows(torch.cat(logits, dim=1), boxes, shape)
        resized = F.interpolate(merged[None], size=image.size, mode="bilinear", align_corners=False)[0]
        for h, part in enumerate(resized.split([x.shape[1] for x in logits])):
            probs = part.softmax(0)
            probs = probs.flip(-1) if flipped else probs
            if len(image.sums) <= h:
                image.sums.append(probs)
            else:
                image.sums[h] += probs
        image.views_left -= 1


def merge_windows(logits: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], shape: tuple[int, int]) -> torch.Tensor:
    """Window logits (n, K, gh, gw) -> (K, H, W): each resized to its window, summed, divided by the
    number of windows covering each pixel (mmseg ``slide_inference``)."""
    total = logits.new_zeros((logits.shape[1], *shape))
    count = logits.new_zeros((1, *shape))
    sizes = {(y2 - y1, x2 - x1) for y1, y2, x1, x2 in boxes}
    resized: torch.Tensor | list[torch.Tensor]
    if len(sizes) == 1:  # the usual case: every window has the crop's size, resize them in one call
        resized = F.interpolate(logits, size=sizes.pop(), mode="bilinear", align_corners=False)
    else:
        resized = [F.interpolate(w[None], size=(b[1] - b[0], b[3] - b[2]), mode="bilinear", align_corners=False)[0]
                   for w, b in zip(logits, boxes, strict=True)]  # fmt: skip
    for window, (y1, y2, x1, x2) in zip(resized, boxes, strict=True):
        total[:, y1:y2, x1:x2] += window
        count[:, y1:y2, x1:x2] += 1
    return total / count
