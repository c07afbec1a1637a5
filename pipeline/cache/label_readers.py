"""Readers of the label formats people have on disk, in original image coordinates, and rasterisers
of sparse labels onto the model canvas.

Usage::

    mask = read_mask("SegmentationClass/2007_000032.png")          # (H, W) uint8, 255 = void
    strokes, size = read_scribble_xml("scribbles/2007_000032.xml")
    canvas, outside = draw_strokes(strokes, fit_geometry(h, w, 448))  # (448, 448) uint8, 255 = unlabeled
    clicks = read_points_json("points.json", background="points_bg.json")
    cls = read_cls_labels("cls_labels.npy")                          # id -> float32[20]

Dense masks are placed on the canvas by :func:`pipeline.cache.geometry.mask_to_canvas`; sparse labels are
drawn here directly on the canvas, because resizing a raster of 1-px clicks or 3-px lines would lose them.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from pipeline.cache.datasets import mask_table
from pipeline.cache.geometry import IGNORE, Geometry, points_to_canvas
from pipeline.cache.voc import NUM_CLASSES, SCRIBBLE_TAGS, palette
from pipeline.errors import LabelError

log = logging.getLogger(__name__)

MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
#: Stem endings of Cityscapes masks: trainIds (read as is), labelIds (mapped to trainIds when read).
CITYSCAPES_MASK_ENDINGS = ("_gtFine_labelTrainIds", "_gtFine_labelIds")
#: Colours an RGB mask may hold: the palette colours of the classes and of void (255).
_VALID_INDICES = np.array([*range(NUM_CLASSES), IGNORE])


# --- dense masks ---------------------------------------------------------------------------------


def read_mask(path: str | Path, mapping: str | None = None) -> np.ndarray:
    """A mask file -> (H, W) uint8 class ids, 255 = void.

    Palette ("P") PNGs give their index array as is (never their colours); "L" as is; 16- and 32-bit
    integer images their values (at most 255); RGB/RGBA masks are decoded through the VOC palette.
    ``mapping`` names a dataset's convention (:data:`pipeline.cache.datasets.MASK_MAPPINGS`): "ade20k"
    maps 0 -> 255 and k -> k - 1; "cityscapes" maps ``*_labelIds`` files to trainIds.
    Raises LabelError naming the file when it cannot be read or holds values that are not class ids.
    """
    path = Path(path)
    return map_mask(_decode_mask(path), path, mapping)


def map_mask(mask: np.ndarray, path: Path, mapping: str | None) -> np.ndarray:
    """The class ids of the mask read from ``path`` under a dataset's ``mapping`` (see :func:`read_mask`)."""
    if mapping is None or (mapping == "cityscapes" and not path.stem.endswith(CITYSCAPES_MASK_ENDINGS[1])):
        return mask
    return mask_table(mapping)[mask]


def _decode_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            mode, arr = im.mode, np.array(im)  # a writable copy
    except FileNotFoundError:
        raise LabelError(f"no mask file {path}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise LabelError(f"cannot read mask {path}: {exc}") from exc
    if mode in ("P", "L"):
        return arr
    if mode in ("LA", "PA"):
        return np.ascontiguousarray(arr[..., 0])
    if mode == "1":
        return arr.astype(np.uint8)
    if mode.startswith("I"):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise LabelError(f"mask {path} ({mode}) holds values {int(arr.min())}..{int(arr.max())}; class ids must be 0..255")
        return arr.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        return decode_rgb(arr[..., :3], path)
    raise LabelError(f"mask {path} has image mode {mode!r}; expected a palette, grayscale or RGB PNG of class ids")


def decode_rgb(rgb: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """(H, W, 3) uint8 VOC-palette colours -> (H, W) uint8 class ids (void colour -> 255).

    Raises LabelError naming the file and a few of its colours that are not in the palette.
    """
    codes = _colour_codes(rgb)
    table = _colour_codes(palette()[_VALID_INDICES])
    order = np.argsort(table)
    pos = np.clip(np.searchsorted(table, codes, sorter=order), 0, len(table) - 1)
    found = table[order[pos]] == codes
    if not found.all():
        bad, counts = np.unique(codes[~found], return_counts=True)
        worst = bad[np.argsort(-counts, kind="stable")][:5]
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in worst.tolist())
        raise LabelError(
            f"RGB mask {path}: {int((~found).sum())} pixels have colours outside the VOC palette, e.g. {shown}; "
            "RGB masks must use the palette colours exactly (lossless PNG, no resizing with interpolation)"
        )
    return _VALID_INDICES[order[pos]].astype(np.uint8)


def _colour_codes(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def find_mask(folder: str | Path, image_id: str, mapping: str | None = None) -> Path | None:
    """The mask file of ``image_id`` in ``folder`` (``<id>.png``, else .bmp/.tif/.tiff) or one of its
    split subfolders, or None; see :class:`MaskFolder`."""
    return MaskFolder(folder, mapping).find(image_id)


class MaskFolder:
    """The mask files of one label source: ``root/<id>.png`` (else .bmp/.tif/.tiff), or one split folder
    down, ``root/<split>/<id>.png`` (``masks/<split>/``, ADE20K's ``annotations/training/``). With
    ``mapping`` "cityscapes" the files are ``[<split>/]<city>/<id>_gtFine_labelTrainIds.png``, else
    ``..._gtFine_labelIds.png`` (mapped to trainIds when read). The split folders are listed once, at
    the first id not found in the root."""

    def __init__(self, root: str | Path, mapping: str | None = None) -> None:
        self.root, self.mapping = Path(root), mapping

    @cached_property
    def split_dirs(self) -> list[Path]:
        try:
            return sorted(Path(e.path) for e in os.scandir(self.root) if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def names(self, image_id: str) -> list[str]:
        """The file names ``image_id``'s mask may have, relative to the root or a split folder, best first."""
        if self.mapping == "cityscapes":
            city = image_id.rsplit("_", 2)[0]
            stems = [f"{image_id}{ending}" for ending in CITYSCAPES_MASK_ENDINGS]
            return [f"{city}/{s}.png" for s in stems] + [f"{s}.png" for s in stems]
        return [f"{image_id}{suffix}" for suffix in MASK_SUFFIXES]

    def find(self, image_id: str) -> Path | None:
        """The mask file of ``image_id``, or None. LabelError when two split folders hold one."""
        names = self.names(image_id)
        found = _first_file(self.root, names)
        if found is not None:
            return found
        hits = [p for d in self.split_dirs if (p := _first_file(d, names)) is not None]
        if len(hits) > 1:
            where = ", ".join(str(p.relative_to(self.root)) for p in hits)
            raise LabelError(f"{self.root} holds masks for {image_id!r} in several splits ({where}); ids must be unique")
        return hits[0] if hits else None

    def read(self, path: Path) -> np.ndarray:
        """The mask at ``path`` (found by :meth:`find`), mapped: (H, W) uint8, 255 = void."""
        return map_mask(read_mask(path), path, self.mapping)


def _first_file(folder: Path, names: list[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


# --- scribbles -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Stroke:
    """One scribble: its class and its polyline, xy (n, 2) float64 (x, y) in original pixels."""

    class_id: int
    xy: np.ndarray


def read_scribble_xml(path: str | Path) -> tuple[list[Stroke], tuple[int, int] | None]:
    """A ScribbleSup XML file -> (strokes, (H, W) from ``<size>`` or None when absent).

    Tags are matched case-insensitively against :data:`pipeline.cache.voc.SCRIBBLE_TAGS` (short tags such as
    "plane", "monitor" and the full class names). Points may lie outside the image; they are kept.
    """
    path = Path(path)
    root = _parse_xml(path)
    strokes = []
    for poly in root.iter("polygon"):
        tag = (poly.findtext("tag") or "").strip()
        if tag.lower() not in SCRIBBLE_TAGS:
            raise LabelError(f"scribble file {path}: unknown tag {tag!r}; known tags: {', '.join(sorted(SCRIBBLE_TAGS))}")
        xy = [(_number(pt, "X", path), _number(pt, "Y", path)) for pt in poly.iter("point")]
        if not xy:
            log.debug("%s: %r stroke without points skipped", path, tag)
            continue
        strokes.append(Stroke(SCRIBBLE_TAGS[tag.lower()], np.asarray(xy, dtype=np.float64)))
    return strokes, _size(root)


def _parse_xml(path: Path) -> ET.Element:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LabelError(f"no scribble file {path}") from None
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:  # local files, but entity expansion is never needed
        raise LabelError(f"scribble file {path} declares a DTD or entities; ScribbleSup XML has none")
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise LabelError(f"scribble file {path} is not valid XML: {exc}") from None


def _number(point: ET.Element, name: str, path: Path) -> float:
    text = point.findtext(name)
    if text is None:
        text = point.findtext(name.lower())
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LabelError(f"scribble file {path}: a point has {name} = {text!r}; expected a number") from None


def _size(root: ET.Element) -> tuple[int, int] | None:
    size = root.find("size")
    if size is None:
        return None
    try:
        return int(float(size.findtext("height", ""))), int(float(size.findtext("width", "")))
    except ValueError:
        return None


# --- points --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One click: (x, y) in original pixels (pixel centres at integers) and its class (0 = background)."""

    x: float
    y: float
    class_id: int


def read_points_json(path: str | Path, background: str | Path | None = None) -> dict[str, list[Point]]:
    """ "What's the Point" clicks, ``{id: [{"x", "y", "cls", "rank"}, ...]}`` -> id -> points.

    ``background`` names a second file of background clicks (class 0); its clicks follow the
    foreground clicks of the same id. Keys go through :func:`normalize_id`.
    """
    points = _read_points(Path(path), background=False)
    if background is not None:
        for key, extra in _read_points(Path(background), background=True).items():
            points.setdefault(key, []).extend(extra)
    return points


def _read_points(path: Path, background: bool) -> dict[str, list[Point]]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabelError(f"no points file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelError(f"points file {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise LabelError(f"points file {path} holds a {type(raw).__name__}; expected {{id: [{{x, y, cls}}, ...]}}")
    out: dict[str, list[Point]] = {}
    for key, clicks in raw.items():
        try:
            out[normalize_id(key)] = [_point(c, background) for c in clicks]
        except (TypeError, KeyError, ValueError) as exc:
            raise LabelError(f"points file {path}, id {key}: bad click ({exc}); expected {{x, y, cls}} entries") from None
    return out


def _point(click: Mapping[str, Any], background: bool) -> Point:
    cls = int(click.get("cls", 0)) if background else int(click["cls"])
    if background and cls != 0:
        raise ValueError(f"cls {cls} in the background file")
    if not 0 <= cls < NUM_CLASSES:
        raise ValueError(f"cls {cls} is not a class id 0..{NUM_CLASSES - 1}")
    return Point(float(click["x"]), float(click["y"]), cls)


# --- image-level labels --------------------------------------------------------------------------


def normalize_id(key: object) -> str:
    """A label-file key -> a VOC image id string. IRN stores ids as integers (2007000032): integers
    of 10 digits become "2007_000032"; other keys become their string form."""
    if isinstance(key, bytes):
        key = key.decode()
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        digits = str(int(key))
        return f"{digits[:4]}_{digits[4:]}" if len(digits) == 10 else digits
    return str(key).strip()


def read_cls_labels(path: str | Path) -> dict[str, np.ndarray]:
    """A ``cls_labels.npy`` (a pickled dict id -> 20 multi-hot, no background slot) -> id -> float32 (20,).

    The pickle is read by an unpickler that only builds numpy arrays and plain Python values, so a
    crafted file cannot run code. Integer keys (IRN's copy) become VOC ids (see :func:`normalize_id`).
    """
    path = Path(path)
    raw = _load_pickled_npy(path)
    if not isinstance(raw, dict):
        raise LabelError(f"{path} holds a {type(raw).__name__}; expected a dict id -> 20 class flags (np.save of a dict)")
    out: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        arr = np.asarray(value, dtype=np.float32)
        if arr.shape != (NUM_CLASSES - 1,):
            raise LabelError(
                f"{path}: id {key} has labels of shape {np.shape(value)}; expected ({NUM_CLASSES - 1},), no background slot"
            )
        out[normalize_id(key)] = arr
    return out


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and scalars only; numpy 1.x module names map to numpy 2.x ones."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles store bytes through it
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):
            module = "numpy._core" + module.removeprefix("numpy.core")
        if (module, name) in self._ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a label file")


def _load_pickled_npy(path: Path) -> object:
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            # latin1 lets numpy arrays pickled by Python 2 load (numpy's own advice); Python 3 pickles ignore it
            arr = _ArrayUnpickler(f, encoding="latin1").load() if dtype == np.dtype(object) else None
    except FileNotFoundError:
        raise LabelError(f"no image-level label file {path}") from None
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as exc:
        raise LabelError(f"cannot read {path} as a pickled .npy dict: {exc}") from None
    if arr is None:
        raise LabelError(f"{path} holds a {dtype} array of shape {shape}; expected a pickled dict (np.save of a dict)")
    return arr.item() if isinstance(arr, np.ndarray) and arr.shape == () else arr


# --- sparse labels on the canvas -----------------------------------------------------------------


def _inside(xy: np.ndarray, geom: Geometry) -> np.ndarray:
    """(n,) bool: the point falls on an original pixel (pixel ``i`` spans [i - 0.5, i + 0.5))."""
    x, y = np.floor(xy[:, 0] + 0.5), np.floor(xy[:, 1] + 0.5)
    return (x >= 0) & (x < geom.width) & (y >= 0) & (y < geom.height)


def draw_strokes(strokes: Iterable[Stroke], geom: Geometry, width: int = 3) -> tuple[np.ndarray, int]:
    """Strokes -> ((S, S) uint8 canvas, number of stroke points outside the original image).

    The canvas is 255 except the strokes, drawn in order as ``width``-px polylines in canvas pixels
    and clipped to the content region (lines running past the image edge stop there).
    """
    image = Image.new("L", (geom.canvas, geom.canvas), IGNORE)
    draw = ImageDraw.Draw(image)
    outside = 0
    for stroke in strokes:
        xy = np.asarray(stroke.xy, dtype=np.float64).reshape(-1, 2)
        outside += int((~_inside(xy, geom)).sum())
        # PIL truncates float coordinates; rounding first puts each vertex on its nearest pixel
        pts = [(float(x), float(y)) for x, y in np.rint(points_to_canvas(xy, geom))]
        if len(pts) > 1:
            draw.line(pts, fill=stroke.class_id, width=width, joint="curve")
        r = (width - 1) / 2
        for x, y in (pts[0], pts[-1]):  # round ends; a single-point stroke becomes a dot
            if r > 0:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=stroke.class_id)
            else:
                draw.point((x, y), fill=stroke.class_id)
    canvas = np.array(image)
    canvas[~geom.content_mask()] = IGNORE
    return canvas, outside


def draw_points(points: Iterable[Point], geom: Geometry, radius: int = 0) -> tuple[np.ndarray, int]:
    """Clicks -> ((S, S) uint8 canvas, number of clicks dropped because they lie outside the image).

    Each in-image click marks the canvas pixel nearest to it, whatever the resize ratio (clamped into
    the content region against rounding at its edges), or with ``radius`` > 0 the disk of that radius
    around it, clipped to the content. Background clicks are drawn first, so a foreground click wins
    where two meet.
    """
    canvas = np.full((geom.canvas, geom.canvas), IGNORE, dtype=np.uint8)
    pts = sorted(points, key=lambda p: p.class_id != 0)
    if not pts:
        return canvas, 0
    xy = np.array([(p.x, p.y) for p in pts], dtype=np.float64)
    keep = _inside(xy, geom)
    cxy = np.rint(points_to_canvas(xy[keep], geom)).astype(np.int64)
    cx = np.clip(cxy[:, 0], geom.pad_left, geom.pad_left + geom.resized_width - 1)
    cy = np.clip(cxy[:, 1], geom.pad_top, geom.pad_top + geom.resized_height - 1)
    classes = [p.class_id for p, k in zip(pts, keep, strict=True) if k]
    content = geom.content_mask()
    for x, y, cls in zip(cx.tolist(), cy.tolist(), classes, strict=True):
        if radius <= 0:
            canvas[y, x] = cls
            continue
        s = geom.canvas
        y0, y1, x0, x1 = max(0, y - radius), min(s, y + radius + 1), max(0, x - radius), min(s, x + radius + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disk = ((yy - y) ** 2 + (xx - x) ** 2 <= radius**2) & content[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1][disk] = cls
    return canvas, int((~keep).sum())


def sparse_mask_to_canvas(mask: np.ndarray, geom: Geometry) -> np.ndarray:
    """A rasterised sparse label (H, W), 255 = unlabelled -> canvas, each labelled pixel moved to its
    nearest canvas pixel, so thin strokes survive downscaling (a nearest resize would drop them)."""
    ys, xs = np.nonzero(mask != IGNORE)
    out = np.full((geom.canvas, geom.canvas), IGNORE, dtype=np.uint8)
    if ys.size:
        xy = np.rint(points_to_canvas(np.stack([xs, ys], axis=1), geom)).astype(np.int64)
        x = np.clip(xy[:, 0], geom.pad_left, geom.pad_left + geom.resized_width - 1)
        y = np.clip(xy[:, 1], geom.pad_top, geom.pad_top + geom.resized_height - 1)
        out[y, x] = mask[ys, xs]
    return out
