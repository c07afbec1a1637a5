"""Label kinds: the registry of label formats ssvt reads, and the label sources that name them.

A *label source* is an entry of ``ssvt.toml`` (``[labels.NAME]``: a kind and where its files are). A
*label kind* says how to read such files image by image and what the labels are good for: whether
they are sparse (scribbles, clicks: trained with the sampled loss), whether a head can be trained on
them (image-level labels cannot), and whether they are dense masks at image resolution (usable as
ground truth). Configuration checks, import, evaluation and the CLI help all read this registry, so
a new format is one :func:`register_label_kind` call plus its reader::

    source = LabelSource("eps", "mask", Path("EPS/result/cam_png"))
    reader = source.spec.reader(source, num_classes=21)
    canvas = reader.canvas("2007_000032", geom)      # (S, S) uint8 on the store's canvas, 255 = ignore
    mask = reader.original("2007_000032", geom)      # dense kinds: (H, W) uint8 at the image's size
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cache import label_readers as readers
from pipeline.cache.datasets import MASK_MAPPINGS
from pipeline.cache.geometry import IGNORE, Geometry, mask_to_canvas
from pipeline.errors import ConfigError, LabelError


@dataclass(frozen=True)
class LabelSource:
    """A named label source of the workspace: its kind and where its files are. ``mapping`` names a
    dataset's mask convention (:data:`pipeline.cache.datasets.MASK_MAPPINGS`, e.g. ADE20K's 0 = ignore),
    applied to mask kinds as they are read."""

    name: str
    kind: str
    path: Path
    background: Path | None = None
    mapping: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise ConfigError(f"label source {self.name!r} has kind {self.kind!r}; valid kinds are {', '.join(LABEL_KINDS)}")
        if self.mapping is not None and self.mapping not in MASK_MAPPINGS:
            raise ConfigError(f"label source {self.name!r} has mapping {self.mapping!r}; valid: {', '.join(MASK_MAPPINGS)}")

    @property
    def spec(self) -> LabelKind:
        return LABEL_KINDS[self.kind]

    def reader(self, num_classes: int) -> KindReader:
        """A reader of this source's labels for a ``num_classes``-class problem."""
        return self.spec.reader(self, num_classes)

    def require_dense(self, purpose: str = "ground truth") -> None:
        """ConfigError unless this source holds dense masks at image resolution (``purpose`` needs them)."""
        if not self.spec.dense:
            raise ConfigError(
                f"label source {self.name!r} has kind {self.kind!r}; {purpose} needs dense masks "
                f"(kinds {', '.join(dense_kinds())})"
            )


class KindReader:
    """Reads one label source image by image. ``dropped`` counts stroke points or clicks that fell
    outside their image; ``image_level`` is id -> class flags for image-level kinds, else None."""

    def __init__(self, source: LabelSource, num_classes: int) -> None:
        self.source, self.num_classes, self.dropped = source, num_classes, 0
        self.image_level: dict[str, np.ndarray] | None = None

    def canvas(self, image_id: str, geom: Geometry) -> np.ndarray | None:
        """(S, S) uint8 labels of ``image_id`` on the model canvas (255 = ignore), or None without a label."""
        raise NotImplementedError

    def original(self, image_id: str, geom: Geometry | None = None) -> tuple[Path, np.ndarray] | None:
        """(file, (H, W) uint8 mask at the image's own resolution, 255 = void), or None without one.

        Dense kinds only (ground truth). With ``geom``, a mask of another size than the image is a
        LabelError naming the file."""
        self.source.require_dense()
        return None

    def has_mask(self, image_id: str) -> bool:
        """Whether :meth:`original` finds a mask for ``image_id`` (dense kinds; cheaper than reading it)."""
        return self.original(image_id) is not None

    def check_classes(self, values: np.ndarray, where: str) -> None:
        bad = np.unique(values[(values >= self.num_classes) & (values != IGNORE)])
        if bad.size:
            raise LabelError(
                f"{where}: label values {bad[:10].tolist()} are neither classes 0..{self.num_classes - 1} nor {IGNORE}"
            )


class MaskReader(KindReader):
    """One mask file per image, ``<id>.png`` (or .bmp/.tif, or one split folder down): palette, grayscale,
    16-bit or RGB, mapped by the source's ``mapping`` (:class:`pipeline.cache.label_readers.MaskFolder`)."""

    def __init__(self, source: LabelSource, num_classes: int) -> None:
        super().__init__(source, num_classes)
        self.folder = readers.MaskFolder(source.path, source.mapping)

    def read(self, image_id: str, geom: Geometry | None) -> tuple[Path, np.ndarray] | None:
        path = self.folder.find(image_id)
        if path is None:
            return None
        mask = self.folder.read(path)
        if geom is not None and mask.shape != (geom.height, geom.width):
            raise LabelError(f"{path} is {mask.shape[1]}x{mask.shape[0]} but its image is {geom.width}x{geom.height} (W x H)")
        return path, mask

    def original(self, image_id: str, geom: Geometry | None = None) -> tuple[Path, np.ndarray] | None:
        return self.read(image_id, geom)

    def has_mask(self, image_id: str) -> bool:
        return self.folder.find(image_id) is not None

    def canvas(self, image_id: str, geom: Geometry) -> np.ndarray | None:
        found = self.read(image_id, geom)
        if found is None:
            return None
        path, mask = found
        self.check_classes(mask, str(path))
        return self.to_canvas(mask, geom)

    def to_canvas(self, mask: np.ndarray, geom: Geometry) -> np.ndarray:
        return mask_to_canvas(mask, geom)


class ScribblePngReader(MaskReader):
    """Rasterised scribbles (255 canvas, thin lines): every labelled pixel moves to its nearest canvas
    pixel, so no stroke is lost to downscaling. Sparse, so no ground truth."""

    original = KindReader.original
    has_mask = KindReader.has_mask

    def to_canvas(self, mask: np.ndarray, geom: Geometry) -> np.ndarray:
        return readers.sparse_mask_to_canvas(mask, geom)


class ScribbleXmlReader(KindReader):
    """ScribbleSup: ``<id>.xml`` per image, drawn as 3-px polylines after the resize."""

    def canvas(self, image_id: str, geom: Geometry) -> np.ndarray | None:
        xml = self.source.path / f"{image_id}.xml"
        if not xml.exists():
            return None
        strokes, _ = readers.read_scribble_xml(xml)
        self.check_classes(np.array([s.class_id for s in strokes], dtype=np.int64), str(xml))
        canvas, dropped = readers.draw_strokes(strokes, geom)
        self.dropped += dropped
        return canvas


class PointsJsonReader(KindReader):
    """ "What's the Point" clicks (+ an optional background file), one canvas pixel per click."""

    def __init__(self, source: LabelSource, num_classes: int) -> None:
        super().__init__(source, num_classes)
        self.points = readers.read_points_json(source.path, source.background)

    def canvas(self, image_id: str, geom: Geometry) -> np.ndarray | None:
        if image_id not in self.points:
            return None
        clicks = self.points[image_id]
        self.check_classes(np.array([p.class_id for p in clicks], dtype=np.int64), f"{self.source.path} [{image_id}]")
        canvas, dropped = readers.draw_points(clicks, geom)
        self.dropped += dropped
        return canvas


class ClsLabelsReader(KindReader):
    """``cls_labels.npy``: image-level class flags. An entry labels its image but no pixel, so its
    canvas is all 255; the flags themselves are kept (``image_level``)."""

    def __init__(self, source: LabelSource, num_classes: int) -> None:
        super().__init__(source, num_classes)
        self.image_level = readers.read_cls_labels(source.path)

    def canvas(self, image_id: str, geom: Geometry) -> np.ndarray | None:
        assert self.image_level is not None
        return np.full((geom.canvas, geom.canvas), IGNORE, dtype=np.uint8) if image_id in self.image_level else None


@dataclass(frozen=True)
class LabelKind:
    """One registry entry.

    ``sparse``: few labelled pixels, trained with the sampled loss. ``trainable``: a head can learn
    from the labels directly (image-level flags must become pseudo-masks first). ``dense``: whole
    masks at image resolution, usable as ground truth. ``suffixes``: file suffixes that make a bare
    path (``--labels PATH``) this kind.
    """

    name: str
    help: str
    reader: Callable[[LabelSource, int], KindReader]
    sparse: bool = False
    trainable: bool = True
    dense: bool = False
    suffixes: tuple[str, ...] = ()


LABEL_KINDS: dict[str, LabelKind] = {}


def register_label_kind(kind: LabelKind) -> LabelKind:
    """Add a label kind to the registry (a name may be registered once)."""
    if kind.name in LABEL_KINDS:
        raise ConfigError(f"label kind {kind.name!r} is registered already")
    LABEL_KINDS[kind.name] = kind
    return kind


def get_label_kind(name: str) -> LabelKind:
    if name not in LABEL_KINDS:
        raise ConfigError(f"unknown label kind {name!r}; valid kinds are {', '.join(LABEL_KINDS)}")
    return LABEL_KINDS[name]


def dense_kinds() -> list[str]:
    return [k.name for k in LABEL_KINDS.values() if k.dense]


def guess_kind(path: str | Path) -> str:
    """The kind of a bare label path from its suffix (``.json`` points, ``.npy`` image-level), else ``mask``."""
    suffix = Path(path).suffix.lower()
    return next((k.name for k in LABEL_KINDS.values() if suffix in k.suffixes), "mask")


def kinds_help() -> str:
    """One line naming every kind and what it is, for help texts."""
    return "; ".join(f"{k.name} ({k.help})" for k in LABEL_KINDS.values())


for _kind in (
    LabelKind("mask", "PNG class ids, palette or grayscale, 255 = ignore", MaskReader, dense=True),
    LabelKind("rgb-mask", "masks in VOC palette colours", MaskReader, dense=True),
    LabelKind("scribble-xml", "ScribbleSup XML", ScribbleXmlReader, sparse=True),
    LabelKind("scribble-png", "rasterised scribbles, 255 = unlabelled", ScribblePngReader, sparse=True),
    LabelKind("points-json", "What's the Point clicks (+ background file)", PointsJsonReader, sparse=True, suffixes=(".json",)),
    LabelKind("cls-labels", "image-level cls_labels.npy, not trainable", ClsLabelsReader, trainable=False, suffixes=(".npy",)),
):
    register_label_kind(_kind)
