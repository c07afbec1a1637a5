"""Image sources (VOC root + split, ``images/[<split>/]`` folder, plain folder or list, ADE20K, Cityscapes)
and decoding to RGB.

Usage::

    items = find_images("VOCdevkit/VOC2012", split="val")     # [ImageItem(id, path), ...]
    items = find_images("ADEChallengeData2016", "validation", "ade20k")
    ds = CanvasDataset(items, size=448, mean=..., std=...)      # for a DataLoader
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.cache.datasets import ADE20K_SPLITS, folder_splits
from pipeline.cache.geometry import fit_geometry
from pipeline.errors import DataError
from pipeline.resample import image_to_canvas

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: Cityscapes image stems end so; the image id is the stem without it.
CITYSCAPES_IMAGE_ENDING = "_leftImg8bit"


@dataclass(frozen=True)
class ImageItem:
    """One image of a dataset: its id (the file stem) and its path."""

    id: str
    path: Path


def read_split_ids(split_file: Path) -> list[str]:
    """Ids from a split file with bare ids or path pairs (``/JPEGImages/x.jpg /Seg.../x.png``)."""
    ids = []
    for line in split_file.read_text().splitlines():
        if line.strip():
            ids.append(Path(line.split()[0]).stem)
    return ids


def voc_images(root: Path, split: str) -> list[ImageItem]:
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        found = sorted(p.stem for p in split_file.parent.glob("*.txt"))
        raise DataError(f"no split file {split_file}; splits found there: {', '.join(found) or 'none'}")
    images = root / "JPEGImages"
    return [ImageItem(i, _with_suffix(images, i)) for i in read_split_ids(split_file)]


def _with_suffix(folder: Path, stem: str) -> Path:
    jpg = folder / f"{stem}.jpg"
    if jpg.exists():
        return jpg
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").exists():
            return folder / f"{stem}{suffix}"
    return jpg  # missing: reported as unreadable when decoded, like any other bad file


def folder_images(folder: Path, split: str | None = None) -> list[ImageItem]:
    """Every image file in ``folder/images/<split>`` (a folder dataset with one folder per split),
    ``folder/images`` (when present) or ``folder``, sorted by stem."""
    splits = folder_splits(folder)
    if splits:
        if split is None or split not in splits:
            choose = f"no split {split!r} there" if split else "choose one with --split"
            raise DataError(f"{folder / 'images'} has one folder per split ({', '.join(splits)}); {choose}")
        folder = folder / "images" / split
    elif (folder / "images").is_dir():
        folder = folder / "images"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    stems = [p.stem for p in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise DataError(f"{folder} has several images with the same stem: {dupes[:5]}; ids must be unique")
    return [ImageItem(p.stem, p) for p in files]


def ade20k_images(root: Path, split: str | None) -> list[ImageItem]:
    """ADEChallengeData2016: ``images/{training,validation}/*.jpg`` (``train``/``val`` name them too)."""
    if split not in ADE20K_SPLITS:
        raise DataError(f"{root} is an ADE20K root: choose --split training or validation (or train, val), got {split!r}")
    return folder_images(root, ADE20K_SPLITS[split])


def cityscapes_images(root: Path, split: str | None) -> list[ImageItem]:
    """Cityscapes: ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png``, ids without the
    ``_leftImg8bit`` ending, sorted by id."""
    images = root / "leftImg8bit"
    found = sorted(p.name for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
    if split is None or split not in found:
        raise DataError(f"{images} has no split {split!r}; splits found there: {', '.join(found) or 'none'} (use --split)")
    files = sorted((images / split).glob(f"*/*{CITYSCAPES_IMAGE_ENDING}.png"))
    if not files:
        raise DataError(f"no <city>/*{CITYSCAPES_IMAGE_ENDING}.png images in {images / split}")
    return [ImageItem(p.stem.removesuffix(CITYSCAPES_IMAGE_ENDING), p) for p in files]


def list_images(list_file: Path) -> list[ImageItem]:
    """Images named one per line in a text file (paths relative to the file's folder)."""
    base = list_file.parent
    return [ImageItem(Path(s).stem, base / s.strip()) for s in list_file.read_text().splitlines() if s.strip()]


def find_images(data: str | Path, split: str | None = None, fmt: str | None = None) -> list[ImageItem]:
    """The images of a dataset (``fmt``: voc, folder, list, ade20k or cityscapes; ``split`` where the
    dataset has several). ``fmt`` None detects the format from the path (:func:`detect_format`)."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"dataset path {data} does not exist; pass --data or set [dataset] root in ssvt.toml")
    fmt = fmt or detect_format(data)
    if fmt == "voc":
        if split is None:
            raise DataError(f"{data} is a VOC root: choose a split with --split (e.g. train, val)")
        return voc_images(data, split)
    if fmt == "list":
        return list_images(data)
    if fmt == "ade20k":
        return ade20k_images(data, split)
    if fmt == "cityscapes":
        return cityscapes_images(data, split)
    return folder_images(data, split)


def detect_format(data: Path) -> str:
    """A text file listing images, a VOC root (``JPEGImages/``), a Cityscapes root (``leftImg8bit/``), an
    ADE20K root (``images/training/`` and ``annotations/``), else a folder (``images/<split>/``,
    ``images/`` or plain)."""
    if data.is_file():
        return "list"
    if (data / "JPEGImages").is_dir():
        return "voc"
    if (data / "leftImg8bit").is_dir():
        return "cityscapes"
    return "ade20k" if (data / "images" / "training").is_dir() and (data / "annotations").is_dir() else "folder"


def load_rgb(path: Path) -> Image.Image:
    """Any image file -> an RGB PIL image, EXIF orientation applied.

    Grayscale, palette, RGBA/LA (alpha dropped, as ``convert("RGB")`` does), CMYK and 16-bit or
    float images all become 8-bit RGB; 16-bit and float data are scaled by their dtype's range.
    Raises DataError naming the path when the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            return _to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if im.mode == "F":
            top = 1.0 if arr.max() <= 1.0 else 255.0
        arr8 = np.clip(arr.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


class CanvasDataset(torch.utils.data.Dataset):
    """Decodes and places images on the model canvas, in DataLoader workers.

    Item ``i`` -> (i, pixels (3, S, S) float32, geometry row (6,) int32, error str). A file that
    cannot be read gives zero pixels, a zero geometry row and its error message, so one bad file
    never stops a run.
    """

    def __init__(self, items: list[ImageItem], size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.items, self.size, self.mean, self.std = items, size, mean, std

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor, str]:
        item = self.items[index]
        try:
            image = load_rgb(item.path)
        except DataError as exc:
            zeros = torch.zeros(3, self.size, self.size)
            return index, zeros, torch.zeros(6, dtype=torch.int32), str(exc)
        geom = fit_geometry(image.height, image.width, self.size)
        pixels = image_to_canvas(image, geom, self.mean, self.std)
        return index, pixels, torch.from_numpy(geom.to_row()), ""
