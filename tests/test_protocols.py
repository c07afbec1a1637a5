"""Protocol geometry and the online engine against an independent loop written from the mmseg 0.x semantics.

The reference below follows the description of the official DINOv2 test pipelines (MultiScaleFlipAug,
Resize(keep_ratio=True), slide_inference with CenterPadding), not :mod:`pipeline.inference`: explicit
loops over ratios, flips and windows, one backbone call per window and head.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.features.backbones import Backbone, build_backbone
from pipeline.features.data import ImageItem
from pipeline.heads import SegHead, build_head
from pipeline.inference.online import ImageProbs, OnlinePredictor
from pipeline.inference.protocols import PROTOCOLS, Protocol, centre_pad, rescaled_size, view_scale, window_boxes

CPU = torch.device("cpu")
K = 5
PATCH = 14
Heads = Sequence[tuple[SegHead, Sequence[int]]]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return build_backbone("vit_tiny_test", None, seed=0)


def make_head(name: str, in_channels: int, n_layers: int = 1, seed: int = 0, **options: int) -> SegHead:
    """A random head with random BatchNorm statistics, so that eval mode and channel order both matter."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = build_head(name, in_channels, K, n_layers=n_layers, **options)
        for module in head.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(1.0, 3.0)
    return head.eval()


def write_image(folder: Path, name: str, height: int, width: int, seed: int) -> tuple[ImageItem, np.ndarray]:
    """A random RGB PNG; returns its item and its (H, W, 3) uint8 pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path = folder / f"{name}.png"
    Image.fromarray(pixels).save(path)
    return ImageItem(name, path), pixels


def run(
    backbone: Backbone, heads: Heads, protocol: Protocol, items: list[ImageItem], batch_size: int = 4
) -> tuple[list[ImageProbs], int]:
    predictor = OnlinePredictor(backbone, heads, protocol, CPU, batch_size=batch_size, workers=0)
    return list(predictor.run(items)), predictor.windows_run


# ---- the reference, from the description of the official pipeline ----


def ref_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def ref_boxes(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) as mmseg's slide_inference computes them."""
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * stride, j * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def ref_slide(
    view: torch.Tensor, backbone: Backbone, head: SegHead, layers: Sequence[int], crop: int, stride: int
) -> tuple[torch.Tensor, int]:
    """view (1, 3, h, w) normalised -> merged logits (K, h, w) and the number of windows."""
    h, w = view.shape[-2:]
    total = torch.zeros(K, h, w)
    count = torch.zeros(h, w)
    boxes = ref_boxes(h, w, crop, stride)
    for y1, y2, x1, x2 in boxes:
        wh, ww = y2 - y1, x2 - x1
        ph, pw = -wh % PATCH, -ww % PATCH
        padded = torch.zeros(1, 3, wh + ph, ww + pw)
        padded[:, :, ph // 2 : ph // 2 + wh, pw // 2 : pw // 2 + ww] = view[:, :, y1:y2, x1:x2]
        tokens, _ = backbone(padded, tuple(layers))
        logits = head(tokens)
        assert logits.shape == (1, K, (wh + ph) // PATCH, (ww + pw) // PATCH)
        total[:, y1:y2, x1:x2] += F.interpolate(logits, size=(wh, ww), mode="bilinear", align_corners=False)[0]
        count[y1:y2, x1:x2] += 1
    return total / count, len(boxes)


def reference(
    pixels: np.ndarray, backbone: Backbone, head: SegHead, layers: Sequence[int], protocol: Protocol
) -> tuple[torch.Tensor, int]:
    """(H, W, 3) uint8 -> probabilities (K, H, W) averaged over ratios x flips, and the windows run."""
    height, width = pixels.shape[:2]
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    probs, views, windows = torch.zeros(K, height, width), 0, 0
    with torch.no_grad():
        for ratio in protocol.ratios:
            scale = (int(protocol.scale[0] * ratio), int(protocol.scale[1] * ratio))
            resized = F.interpolate(image, size=ref_size(height, width, scale), mode="bilinear", align_corners=False)
            view = (resized.round().clamp(0, 255) / 255 - mean) / std
            for flipped in (False, True) if protocol.flip else (False,):
                logits, n = ref_slide(view.flip(-1) if flipped else view, backbone, head, layers, protocol.crop, protocol.stride)
                full = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
                p = full.softmax(0)
                probs += p.flip(-1) if flipped else p
                views, windows = views + 1, windows + n
    return probs / views, windows


# ---- geometry ----


def test_rescaled_size_follows_mmcv_imrescale() -> None:
    assert rescaled_size(375, 500, (2048, 512)) == (512, 683)  # the official example: short side 512
    assert rescaled_size(500, 375, (2048, 512)) == (683, 512)
    assert rescaled_size(100, 2000, (2048, 512)) == (102, 2048)  # the long cap binds
    assert rescaled_size(375, 500, (512, 2048)) == (512, 683)  # the order of the scale does not matter
    assert view_scale((2048, 512), 1.32) == (2703, 675)  # truncated, as MultiScaleFlipAug does
    assert view_scale((99999999, 640), 1.73) == (172999998, 1107)
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        scale = (int(rng.integers(1, 4000)), int(rng.integers(1, 1000)))
        assert rescaled_size(h, w, scale) == ref_size(h, w, scale), (h, w, scale)


def test_official_protocols() -> None:
    lin, ms = PROTOCOLS["lin"], PROTOCOLS["ms"]
    assert (lin.scale, lin.ratios, lin.flip, lin.crop, lin.stride) == ((2048, 512), (1.0,), False, 512, 341)
    assert (ms.scale, ms.ratios, ms.flip, ms.crop, ms.stride) == ((99999999, 640), (1.0, 1.32, 1.73, 2.28, 3.0), True, 640, 320)
    assert ms.views[:3] == [(1.0, False), (1.0, True), (1.32, False)]
    assert window_boxes(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]


def test_window_boxes_tile_the_image() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 200, 2))
        crop = int(rng.integers(1, 120))
        stride = int(rng.integers(1, crop + 1))
        boxes = window_boxes(h, w, crop, stride)
        case = (h, w, crop, stride)
        h_grids = max(h - crop + stride - 1, 0) // stride + 1
        w_grids = max(w - crop + stride - 1, 0) // stride + 1
        assert len(boxes) == h_grids * w_grids, case
        assert boxes == ref_boxes(h, w, crop, stride), case
        covered = np.zeros((h, w), dtype=int)
        for y1, y2, x1, x2 in boxes:
            assert 0 <= y1 < y2 <= h, case
            assert 0 <= x1 < x2 <= w, case
            assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w)), case
            covered[y1:y2, x1:x2] += 1
        assert covered.min() >= 1, case
        assert boxes[-1][1::2] == (h, w), case
        assert {b[3] for b in boxes[w_grids - 1 :: w_grids]} == {w}, case  # the last column ends at the border
        assert {b[1] for b in boxes[-w_grids:]} == {h}, case  # the last row too
    assert window_boxes(30, 40, 64, 32) == [(0, 30, 0, 40)]
    assert window_boxes(64, 64, 64, 64) == [(0, 64, 0, 64)]


@pytest.mark.parametrize(("height", "width"), [(17, 28), (16, 29), (28, 14), (1, 13), (15, 15)])
def test_centre_pad_puts_the_odd_pixel_bottom_right(height: int, width: int) -> None:
    x = torch.rand(2, 3, height, width) + 1
    ph, pw = -height % PATCH, -width % PATCH
    expected = torch.zeros(2, 3, height + ph, width + pw)
    expected[..., ph // 2 : ph // 2 + height, pw // 2 : pw // 2 + width] = x
    out = centre_pad(x, PATCH)
    assert out.shape == expected.shape
    assert torch.equal(out, expected)
    assert torch.equal(centre_pad(x[0, 0], PATCH), expected[0, 0])  # any leading dims


# ---- the engine ----

OVERLAP = Protocol("overlap", scale=(2048, 70), ratios=(1.0,), flip=False, crop=45, stride=30)  # 45 -> padded to 56
NARROW = Protocol("narrow", scale=(2048, 40), ratios=(1.0,), flip=False, crop=63, stride=40)  # views 40 px, crop 63
ONE_WINDOW = Protocol("one-window", scale=(2048, 42), ratios=(1.0,), flip=False, crop=112, stride=56)
MS_LIKE = Protocol("ms-like", scale=(99999999, 42), ratios=(1.0, 1.73), flip=True, crop=50, stride=28)
ENGINE_CASES = {
    "overlap": (OVERLAP, [(60, 90), (120, 90)]),
    "narrow": (NARROW, [(30, 100), (100, 30)]),
    "one-window": (ONE_WINDOW, [(33, 47)]),
    "ms-like": (MS_LIKE, [(33, 47), (50, 31)]),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_matches_the_reference_loop(backbone, tmp_path, case) -> None:
    protocol, sizes = ENGINE_CASES[case]
    heads = [
        (make_head("bn-linear", 48, seed=1), (2,)),
        (make_head("bn-linear", 96, n_layers=2, seed=2), (0, 2)),
        (make_head("linear", 96, n_layers=2, seed=3), (2, 0)),  # channels in the head's own block order
    ]
    images = [write_image(tmp_path, f"im{i}", h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    results, windows_run = run(backbone, heads, protocol, [item for item, _ in images], batch_size=3)
    expected_windows = 0
    for result, (item, pixels) in zip(results, images, strict=True):
        assert result.item == item
        assert not result.error
        assert result.size == pixels.shape[:2]
        assert len(result.probs) == len(heads)
        for probs, (head, layers) in zip(result.probs, heads, strict=True):
            expected, n = reference(pixels, backbone, head, layers, protocol)
            assert probs.shape == (K, *pixels.shape[:2])
            torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
        expected_windows += n
    assert windows_run == expected_windows


def test_engine_detects_misplaced_windows_in_the_reference(backbone, tmp_path) -> None:
    """The comparison is sharp: the probabilities move far more than the tolerance when a window moves."""
    item, pixels = write_image(tmp_path, "a", 60, 90, seed=0)
    head = make_head("bn-linear", 48, seed=1)
    (result,), _ = run(backbone, [(head, (2,))], OVERLAP, [item])
    shifted = Protocol("shifted", scale=OVERLAP.scale, ratios=(1.0,), flip=False, crop=OVERLAP.crop, stride=OVERLAP.stride + 1)
    other, _ = reference(pixels, backbone, head, (2,), shifted)
    assert (result.probs[0] - other).abs().max() > 1e-2


def test_one_ratio_ms_equals_lin_and_ratios_average(backbone, tmp_path) -> None:
    heads = [(make_head("bn-linear", 48, seed=3), (2,))]
    items = [write_image(tmp_path, f"im{i}", h, w, seed=10 + i)[0] for i, (h, w) in enumerate([(40, 70), (45, 33)])]
    lin = Protocol("lin", scale=(2048, 56), ratios=(1.0,), flip=False, crop=45, stride=30)
    same = [Protocol("ms", scale=(2048, 56), ratios=(1.0,), flip=False, crop=45, stride=30),
            Protocol("ms", scale=(99999999, 56), ratios=(1.0,), flip=False, crop=45, stride=30)]  # fmt: skip
    base, _ = run(backbone, heads, lin, items)
    for protocol in same:
        results, _ = run(backbone, heads, protocol, items)
        for a, b in zip(results, base, strict=True):
            torch.testing.assert_close(a.probs[0], b.probs[0], atol=1e-6, rtol=0)

    ratios = (1.0, 1.32)
    both, _ = run(backbone, heads, Protocol("ms2", scale=(2048, 56), ratios=ratios, flip=False, crop=45, stride=30), items)
    singles = [run(backbone, heads, Protocol("one", view_scale((2048, 56), r), (1.0,), False, 45, 30), items)[0] for r in ratios]
    assert view_scale((2048, 56), 1.32) == (2703, 73)
    for i, result in enumerate(both):
        torch.testing.assert_close(result.probs[0], (singles[0][i].probs[0] + singles[1][i].probs[0]) / 2, atol=1e-6, rtol=0)


def test_flip_is_the_mirrored_image_mirrored_back(backbone, tmp_path) -> None:
    heads = [(make_head("bn-linear", 96, n_layers=2, seed=4), (0, 2))]
    item, pixels = write_image(tmp_path, "a", 56, 83, seed=5)  # already at scale: the mirror rescales to the same bytes
    mirror, _ = write_image(tmp_path, "m", 1, 1, seed=0)
    Image.fromarray(np.ascontiguousarray(pixels[:, ::-1])).save(mirror.path)
    flip = Protocol("flip", scale=(2048, 56), ratios=(1.0,), flip=True, crop=45, stride=30)
    plain = Protocol("plain", scale=(2048, 56), ratios=(1.0,), flip=False, crop=45, stride=30)
    (flipped,), n_flip = run(backbone, heads, flip, [item])
    (direct, mirrored), n_plain = run(backbone, heads, plain, [item, mirror])
    expected = (direct.probs[0] + mirrored.probs[0].flip(-1)) / 2
    torch.testing.assert_close(flipped.probs[0], expected, atol=1e-5, rtol=0)
    assert n_flip == n_plain


def test_heads_share_one_backbone_pass(backbone, tmp_path) -> None:
    heads = [
        (make_head("bn-linear", 48, seed=5), (2,)),
        (make_head("bn-linear", 96, n_layers=2, seed=6), (0, 2)),
        (make_head("linear", 96, n_layers=2, seed=7), (2, 0)),  # channels in the head's own block order
        (make_head("mlp", 48, seed=8, hidden=16), (1,)),
    ]
    items = [write_image(tmp_path, f"im{i}", h, w, seed=20 + i)[0] for i, (h, w) in enumerate([(40, 70), (45, 33), (80, 52)])]
    together, windows_together = run(backbone, heads, MS_LIKE, items)
    views = [ref_size(h, w, view_scale(MS_LIKE.scale, r)) for h, w in [(40, 70), (45, 33), (80, 52)] for r in MS_LIKE.ratios]
    assert windows_together == 2 * sum(len(ref_boxes(h, w, MS_LIKE.crop, MS_LIKE.stride)) for h, w in views)  # 2: the flips
    for h, head in enumerate(heads):
        alone, windows_alone = run(backbone, [head], MS_LIKE, items)
        assert windows_alone == windows_together
        for a, b in zip(together, alone, strict=True):
            assert len(a.probs) == len(heads)
            torch.testing.assert_close(a.probs[h], b.probs[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 64])
def test_items_in_order_and_a_bad_file_does_not_stop_the_run(backbone, tmp_path, batch_size) -> None:
    head = make_head("bn-linear", 48, seed=9)
    images = [
        write_image(tmp_path, name, h, w, seed=30 + i)
        for i, (name, h, w) in enumerate([("a", 40, 70), ("b", 70, 40), ("c", 33, 47)])
    ]
    bad = tmp_path / "x.png"
    bad.write_bytes(b"this is not a png" * 10)
    items = [images[0][0], ImageItem("x", bad), images[1][0], images[2][0]]
    predictor = OnlinePredictor(backbone, [(head, (2,))], OVERLAP, CPU, batch_size=batch_size, workers=0)
    seen: list[tuple[int, int]] = []
    results = list(predictor.run(items, progress=lambda d, t: seen.append((d, t))))
    assert [r.item.id for r in results] == ["a", "x", "b", "c"]
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert "x.png" in results[1].error
    assert results[1].probs == []
    good = [r for r in results if r.item.id != "x"]
    for result, (item, pixels) in zip(good, images, strict=True):
        assert not result.error
        assert result.item == item
        expected, _ = reference(pixels, backbone, head, (2,), OVERLAP)
        torch.testing.assert_close(result.probs[0], expected, atol=1e-5, rtol=0)
