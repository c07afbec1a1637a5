"""A small synthetic VOC-like dataset carrying every label format ssvt reads, for tests and the demo.

Usage::

    toy = make_toy(Path("toy"), n_train=64, n_val=24, seed=0)
    ws = Workspace.load(toy.workspace)          # toy/ssvt.toml
    toy.summary["miou_seam"] < toy.summary["miou_eps"]

Images hold 1-3 objects of a few VOC classes, each class with its own colours and texture, on
textured backgrounds. Ids have the VOC form ``2026_000123`` so that IRN's integer-key rule
(``2026000123``) applies to the ``cls_labels_int.npy`` copy. Each image draws from its own random
stream (``seed``, index), so image ``i`` is the same whatever ``n_train``/``n_val`` are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pipeline.cache.geometry import IGNORE
from pipeline.cache.voc import CLASS_NAMES, NUM_CLASSES, SCRIBBLE_TAGS, palette
from pipeline.errors import ConfigError
from pipeline.templates import TOY_WORKSPACE
from pipeline.training.metrics import ConfusionMatrix

log = logging.getLogger(__name__)

YEAR = 2026
#: class id -> (colour, second colour, texture, period in px); aeroplane, bird, car, cat, person, tvmonitor.
LOOKS: dict[int, tuple[tuple[int, int, int], tuple[int, int, int], str, int]] = {
    1: ((205, 210, 220), (80, 100, 160), "hstripes", 6),
    3: ((235, 205, 40), (130, 70, 20), "spots", 0),
    7: ((205, 30, 30), (35, 35, 35), "checker", 8),
    8: ((235, 140, 50), (250, 230, 200), "vstripes", 5),
    15: ((240, 190, 160), (70, 40, 130), "diag", 10),
    20: ((30, 40, 75), (90, 200, 235), "grid", 7),
}
TOY_CLASSES = tuple(LOOKS)
_BG_COLOURS = np.array(
    [(70, 110, 60), (120, 100, 70), (150, 150, 140), (190, 180, 150), (90, 80, 60), (110, 130, 110)], dtype=np.float64
)
_Objects = list[tuple[np.ndarray, int]]  # (visible mask (H, W) bool, class id) per object
_Strokes = list[tuple[int, list[tuple[int, int]]]]  # (class id, [(x, y), ...]) per stroke
#: The short ScribbleSup tag of each class where it has one (plane, monitor, ...), else its name.
SHORT_TAGS = {c: next((t for t, i in SCRIBBLE_TAGS.items() if i == c and t != n), n) for c, n in enumerate(CLASS_NAMES)}


@dataclass(frozen=True)
class _Level:
    """How strongly a CAM-like pseudo-mask departs from the truth (probabilities and sizes in px)."""

    drop: float  # the object is missed
    confuse: float  # the object gets another class
    part: float  # only a part of the object is covered ...
    cut: float  # ... and how much of the missing part stays missing (1 = all)
    morph: float  # boundary shift (dilation or erosion), px
    smooth: float  # blurring of the shape (rounds corners, loses thin parts), px
    blob: float  # a spurious blob of a co-occurring class


SEAM = _Level(drop=0.05, confuse=0.2, part=0.3, cut=1.0, morph=4.0, smooth=3.0, blob=0.35)
EPS = _Level(drop=0.03, confuse=0.12, part=0.25, cut=0.6, morph=3.0, smooth=2.0, blob=0.25)


@dataclass(frozen=True)
class ToyDataset:
    """What :func:`make_toy` wrote: the folder, its workspace file, the ids and quality figures.

    ``summary`` holds ``miou_seam``, ``miou_eps`` (pseudo-masks vs GT over the train ids, present
    classes), ``miou_vl`` (on confident pixels), ``vl_coverage``, ``objects``, ``clicks_outside`` and
    ``scribble_points_outside``.
    """

    root: Path
    workspace: Path
    voc_root: Path
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    summary: Mapping[str, float]


def make_toy(
    out: Path, *, n_train: int = 64, n_val: int = 24, seed: int = 0, progress: Callable[[int], None] | None = None
) -> ToyDataset:
    """Write the toy dataset and its ``ssvt.toml`` into ``out`` (created; existing files are overwritten)."""
    if n_train < 1 or n_val < 1:
        raise ConfigError(f"the toy dataset needs at least 1 train and 1 val image, got {n_train} and {n_val}")
    out = Path(out)
    voc = out / "VOC2012"
    subs = ("scribbles", "pseudo_seam", "pseudo_eps", "vl", "scribbles_png", "gt_rgb")
    for folder in [
        voc / "JPEGImages",
        voc / "SegmentationClass",
        voc / "ImageSets/Segmentation",
        *(out / "labels" / s for s in subs),
    ]:
        folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{YEAR}_{i:06d}" for i in range(n_train + n_val)]
    train_ids, val_ids = ids[:n_train], ids[n_train:]
    acc = _Accumulator()
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, i])
        image, inst, classes = _render(rng)
        gt = _ground_truth(inst, classes)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
        _save_palette(gt, voc / "SegmentationClass" / f"{image_id}.png")
        acc.cls[image_id] = np.isin(np.arange(1, NUM_CLASSES), gt).astype(np.float32)
        if i < n_train:
            _train_labels(out / "labels", image_id, inst, classes, gt, rng, acc)
        if i < 3:
            Image.fromarray(palette()[gt]).save(out / "labels" / "gt_rgb" / f"{image_id}.png")
        if progress is not None:
            progress(1)
    _write_lists(voc / "ImageSets" / "Segmentation", train_ids, val_ids)
    _write_json(out / "labels" / "points.json", acc.points)
    _write_json(out / "labels" / "points_bg.json", acc.points_bg)
    np.save(out / "labels" / "cls_labels.npy", acc.cls, allow_pickle=True)  # type: ignore[arg-type]
    int_keys = {int(k.replace("_", "")): v for k, v in acc.cls.items()}
    np.save(out / "labels" / "cls_labels_int.npy", int_keys, allow_pickle=True)  # type: ignore[arg-type]
    workspace = write_workspace(out / "ssvt.toml")
    summary = acc.summary()
    log.info("toy dataset in %s: %d train, %d val images; %s", out, n_train, n_val, summary)
    return ToyDataset(out, workspace, voc, tuple(train_ids), tuple(val_ids), summary)


class _Accumulator:
    """Label files gathered over images, and confusion matrices of the imperfect masks vs GT."""

    def __init__(self) -> None:
        self.cls: dict[str, np.ndarray] = {}
        self.points: dict[str, list[dict[str, int]]] = {}
        self.points_bg: dict[str, list[dict[str, int]]] = {}
        self.conf = {name: ConfusionMatrix(NUM_CLASSES) for name in ("seam", "eps", "vl")}
        self.vl_pixels = [0, 0]  # confident, all (where GT is not void)
        self.counts = dict.fromkeys(("objects", "clicks_outside", "scribble_points_outside"), 0.0)

    def summary(self) -> dict[str, float]:
        mious = {f"miou_{name}": cm.miou() for name, cm in self.conf.items()}
        return {**mious, "vl_coverage": self.vl_pixels[0] / max(1, self.vl_pixels[1]), **self.counts}


# --- images and ground truth ---------------------------------------------------------------------


def _render(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """An image (H, W, 3) uint8, its instance map (H, W) int16 (-1 = background) and object classes."""
    long, short = int(rng.integers(150, 201)), int(rng.integers(96, 150))
    h, w = (long, short) if rng.random() < 0.3 else (short, long)  # about a third portrait
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    image = _background(yy, xx, rng)
    inst = np.full((h, w), -1, dtype=np.int16)
    classes: list[int] = []
    for k in range(int(rng.integers(1, 4))):
        cls = int(rng.choice(TOY_CLASSES))
        shape = _shape(yy, xx, rng)
        c0, c1, kind, period = LOOKS[cls]
        t = _pattern(kind, period, yy, xx, rng)[..., None]
        colour = (np.array(c0) * (1 - t) + np.array(c1) * t) * rng.uniform(0.85, 1.1)
        image[shape] = colour[shape]
        inst[shape] = k
        classes.append(cls)
    image = ndimage.gaussian_filter(image, sigma=(0.7, 0.7, 0)) + rng.normal(0, 5, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), inst, classes


def _background(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float: smooth noise, soft stripes or a gradient between two muted colours."""
    c0, c1 = _BG_COLOURS[rng.choice(len(_BG_COLOURS), 2, replace=False)]
    kind, angle = int(rng.integers(3)), rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 0:
        t = ndimage.gaussian_filter(rng.standard_normal(xx.shape), 6)
    elif kind == 1:
        t = np.sin(along * 2 * np.pi / rng.uniform(10, 30))
    else:
        t = along
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _pattern(kind: str, period: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float in [0, 1]: a class's texture, with a random phase."""
    x, y = xx + rng.uniform(0, 16), yy + rng.uniform(0, 16)
    half, stripes = period / 2, {"hstripes": y, "vstripes": x, "diag": x + y}
    if kind in stripes:
        t = stripes[kind] % period < half
    elif kind == "checker":
        t = (np.floor(x / half) + np.floor(y / half)) % 2 == 1
    elif kind == "grid":
        t = (x % period < 2) | (y % period < 2)
    else:  # spots
        t = ndimage.gaussian_filter(rng.standard_normal(xx.shape), 1.5) > 0.25
    return t.astype(np.float64)


def _shape(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool: a rotated ellipse, rectangle or polygon blob, sometimes with a thin part."""
    h, w = xx.shape
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    a, b = rng.uniform(0.12, 0.3) * w, rng.uniform(0.12, 0.3) * h
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    kind = int(rng.integers(3))
    if kind == 0:
        mask = (u / a) ** 2 + (v / b) ** 2 <= 1
    elif kind == 1:
        mask = (np.abs(u) <= a) & (np.abs(v) <= b)
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(6, 11))))
        radii = rng.uniform(0.6, 1.0, len(angles))
        poly = Image.new("L", (w, h), 0)
        ImageDraw.Draw(poly).polygon(
            list(zip(cx + a * radii * np.cos(angles), cy + b * radii * np.sin(angles), strict=True)), fill=1
        )
        mask = np.asarray(poly, dtype=bool)
    if rng.random() < 0.4:  # a wing, leg or antenna: the thin parts CAM-like masks tend to miss
        phi, length, half = rng.uniform(0, 2 * np.pi), rng.uniform(1.1, 1.6) * max(a, b), rng.uniform(1.5, 3)
        along = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
        across = -(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)
        mask |= (along >= 0) & (along <= length) & (np.abs(across) <= half)
    return mask


def _ground_truth(inst: np.ndarray, classes: list[int]) -> np.ndarray:
    """(H, W) uint8 class ids with a 2-px void band (255) on every object boundary, as in VOC."""
    sem = np.array([0, *classes], dtype=np.uint8)[inst + 1]
    band = ndimage.maximum_filter(inst, size=3) != ndimage.minimum_filter(inst, size=3)
    sem[band] = IGNORE
    return sem


# --- imperfect labels ------------------------------------------------------------------------------


def _train_labels(
    folder: Path, image_id: str, inst: np.ndarray, classes: list[int], gt: np.ndarray, rng: np.random.Generator, acc: _Accumulator
) -> None:
    """Scribbles, clicks, pseudo-masks and VL masks of one train image, written or gathered in ``acc``."""
    h, w = inst.shape
    objects = [(inst == k, c) for k, c in enumerate(classes) if (inst == k).any()]
    acc.counts["objects"] += len(objects)
    seam, eps = _cam_pair(objects, (h, w), rng)
    vl = _vision_language(objects, (h, w), rng)
    for name, mask in (("pseudo_seam", seam), ("pseudo_eps", eps), ("vl", vl)):
        Image.fromarray(mask).save(folder / name / f"{image_id}.png")
        acc.conf[name.removeprefix("pseudo_")].update(mask, np.where(mask == IGNORE, IGNORE, gt))  # VL: confident pixels
    acc.vl_pixels[0] += int(((vl != IGNORE) & (gt != IGNORE)).sum())
    acc.vl_pixels[1] += int((gt != IGNORE).sum())
    strokes = _scribbles(objects, inst < 0, rng)
    acc.counts["scribble_points_outside"] += sum(not (0 <= x < w and 0 <= y < h) for _, pts in strokes for x, y in pts)
    _write_scribble_xml(folder / "scribbles" / f"{image_id}.xml", image_id, (h, w), strokes)
    raster = Image.new("L", (w, h), IGNORE)
    draw = ImageDraw.Draw(raster)
    for cls, pts in strokes:
        if len(pts) > 1:
            draw.line(pts, fill=cls, width=3, joint="curve")
        else:
            draw.point(pts, fill=cls)
    raster.save(folder / "scribbles_png" / f"{image_id}.png")
    clicks = [_click(m, c, rng) for m, c in objects]
    if rng.random() < 0.25:  # annotation tools sometimes record clicks past the right edge
        clicks.append({"x": w + int(rng.integers(0, 60)), "y": int(rng.integers(h)), "cls": objects[0][1], "rank": 1})
        acc.counts["clicks_outside"] += 1
    acc.points[image_id] = clicks
    background = inst < 0
    acc.points_bg[image_id] = [_click(background, 0, rng) for _ in range(int(rng.integers(1, 3)))] if background.any() else []


def _cam_pair(objects: _Objects, shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """SEAM-like and EPS-like (H, W) uint8 masks from one set of random draws: EPS makes the milder
    version of each error SEAM makes, so EPS is better image by image, not only on average."""
    draws = [
        {"u": rng.random(4), "wrong": int(rng.choice([c for c in TOY_CLASSES if c != cls])), "phi": rng.uniform(0, 2 * np.pi),
         "keep": rng.uniform(0.35, 0.65), "shift": rng.uniform(0.3, 1.0) * (1 if rng.random() < 0.6 else -1)}
        for _, cls in objects
    ]  # fmt: skip
    present = [c for _, c in objects]
    blob = (rng.random(), rng.uniform(0.2, 0.8, 2) * shape, rng.uniform(6, 16), int(rng.choice(present)))
    return _cam_like(objects, draws, blob, shape, SEAM), _cam_like(objects, draws, blob, shape, EPS)


def _cam_like(objects: _Objects, draws: list[dict], blob: tuple, shape: tuple[int, int], level: _Level) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    for (mask, cls), d in zip(objects, draws, strict=True):
        u_drop, u_confuse, u_part, _ = d["u"]
        if u_drop < level.drop:
            continue
        m = mask
        if u_part < level.part:  # CAMs light up the most discriminative part only
            ys, xs = np.nonzero(m)
            proj = xs * np.cos(d["phi"]) + ys * np.sin(d["phi"])
            limit = np.quantile(proj, 1 - (1 - d["keep"]) * level.cut)
            m = m & ((np.arange(shape[1])[None] * np.cos(d["phi"]) + np.arange(shape[0])[:, None] * np.sin(d["phi"])) <= limit)
        m = ndimage.gaussian_filter(m.astype(np.float64), level.smooth) > 0.5
        r = d["shift"] * level.morph
        m = ndimage.distance_transform_edt(~m) <= r if r > 0 else ndimage.distance_transform_edt(m) > -r
        out[m] = d["wrong"] if u_confuse < level.confuse else cls
    u, centre, radius, cls = blob
    if u < level.blob:  # a spurious blob of a co-occurring class
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
        out[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2] = cls
    return out


def _vision_language(objects: _Objects, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8: a coarse (16-px blocks) class map, 255 near class changes and on some blocks."""
    fine = np.zeros(shape, dtype=np.uint8)
    for mask, cls in objects:
        wrong = rng.random() < 0.3
        grown = ndimage.distance_transform_edt(~mask) <= rng.uniform(0, 6)
        fine[grown] = int(rng.choice([c for c in TOY_CLASSES if c != cls])) if wrong else cls
    coarse = fine[8::16, 8::16]  # one class per 16-px block, like a low-resolution image-text similarity map
    coarse = np.where(rng.random(coarse.shape) < 0.15, IGNORE, coarse).astype(np.uint8)
    out = np.array(Image.fromarray(coarse).resize(shape[::-1], Image.Resampling.NEAREST))
    border = ndimage.maximum_filter(out, size=7) != ndimage.minimum_filter(out, size=7)
    out[border] = IGNORE
    return out


def _walk(region: np.ndarray, start: tuple[int, int], rng: np.random.Generator, steps: int, step: float) -> list[tuple[int, int]]:
    """A stroke: (x, y) points of a random walk from ``start`` whose segments stay on ``region``."""
    h, w = region.shape
    pts = [start]
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(6 * steps):
        if len(pts) > steps:
            break
        x, y = pts[-1]
        nx, ny = round(x + step * np.cos(angle)), round(y + step * np.sin(angle))
        along = [(round(x + f * (nx - x)), round(y + f * (ny - y))) for f in (0.25, 0.5, 0.75, 1.0)]
        if (nx, ny) != (x, y) and all(0 <= px < w and 0 <= py < h and region[py, px] for px, py in along):
            pts.append((nx, ny))
            angle += rng.normal(0, 0.4)
        else:
            angle = rng.uniform(0, 2 * np.pi)
    return pts


def _scribbles(objects: _Objects, background: np.ndarray, rng: np.random.Generator) -> _Strokes:
    """One stroke inside each object and 1-2 background strokes, (class, [(x, y), ...]); in about
    a quarter of the images a background stroke runs a few px past the image edge, as in ScribbleSup."""
    h, w = background.shape
    step = max(4.0, 0.07 * min(h, w))
    strokes = []
    for mask, cls in objects:
        dist = ndimage.distance_transform_edt(mask)
        inner = dist > min(3.0, dist.max() - 0.5)
        ys, xs = np.nonzero(dist >= 0.6 * dist.max())
        i = int(rng.integers(len(ys)))
        strokes.append((cls, _walk(inner, (int(xs[i]), int(ys[i])), rng, int(rng.integers(4, 9)), step)))
    inner_bg = ndimage.distance_transform_edt(np.pad(background, 1, constant_values=True))[1:-1, 1:-1] > 4
    ys, xs = np.nonzero(inner_bg)
    for _ in range(int(rng.integers(1, 3)) if len(ys) else 0):
        i = int(rng.integers(len(ys)))
        strokes.append((0, _walk(inner_bg, (int(xs[i]), int(ys[i])), rng, int(rng.integers(3, 7)), step)))
    if strokes[-1][0] == 0 and rng.random() < 0.25:
        x, y = strokes[-1][1][-1]
        k = int(rng.integers(1, 5))
        target = min([(x, (-k, y)), (w - 1 - x, (w - 1 + k, y)), (y, (x, -k)), (h - 1 - y, (x, h - 1 + k))])[1]
        along = [(round(x + f * (target[0] - x)), round(y + f * (target[1] - y))) for f in np.linspace(0, 1, 32)]
        if all(background[py, px] for px, py in along if 0 <= px < w and 0 <= py < h):
            strokes[-1][1].append(target)
    return strokes


def _click(region: np.ndarray, cls: int, rng: np.random.Generator) -> dict[str, int]:
    """A click on a random pixel of ``region``, away from its border where possible."""
    dist = ndimage.distance_transform_edt(region)
    ys, xs = np.nonzero(dist > min(2.0, dist.max() - 0.5))
    i = int(rng.integers(len(ys)))
    return {"x": int(xs[i]), "y": int(ys[i]), "cls": cls, "rank": 1}


# --- writers ---------------------------------------------------------------------------------------


def _save_palette(mask: np.ndarray, path: Path) -> None:
    image = Image.fromarray(mask)
    image.putpalette(palette().ravel().tolist())  # an "L" image with a palette becomes "P", indices kept
    image.save(path)


def _write_scribble_xml(path: Path, image_id: str, size: tuple[int, int], strokes: _Strokes) -> None:
    polygons = "".join(
        f"  <polygon>\n    <tag>{SHORT_TAGS[cls]}</tag>\n"
        + "".join(f"    <point><X>{x}</X><Y>{y}</Y></point>\n" for x, y in pts)
        + "  </polygon>\n"
        for cls, pts in strokes
    )
    size_xml = f"<size><width>{size[1]}</width><height>{size[0]}</height></size>"
    path.write_text(f"<annotation>\n  <filename>{image_id}.jpg</filename>\n  {size_xml}\n{polygons}</annotation>\n")


def _write_lists(folder: Path, train_ids: list[str], val_ids: list[str]) -> None:
    (folder / "train.txt").write_text("".join(f"{i}\n" for i in train_ids))
    (folder / "val.txt").write_text("".join(f"{i}\n" for i in val_ids))
    (folder / "train_pairs.txt").write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClass/{i}.png\n" for i in train_ids))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, sort_keys=True, indent=1) + "\n")


def write_workspace(path: Path, text: str = TOY_WORKSPACE) -> Path:
    """Write the toy's ``ssvt.toml`` (paths relative to the file) to ``path``; returns ``path``."""
    path.write_text(text)
    return path
