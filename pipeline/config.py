"""Stage configs (frozen dataclasses) and the ``ssvt.toml`` workspace file.

Usage::

    ws = Workspace.load("ssvt.toml")
    cfg = ExtractConfig(model="dinov2_vitl14", size=448, layers="last")
    store = ws.store_path(cfg, "val")      # cache/dinov2_vitl14-448-last/val.zarr
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pipeline.cache.geometry import PATCH
from pipeline.errors import ConfigError

WORKSPACE_FILE = "ssvt.toml"
DATA_FORMATS = ("voc", "folder", "list")
LABEL_KINDS = ("mask", "rgb-mask", "scribble-xml", "scribble-png", "points-json", "cls-labels")


class _Dict:
    """``to_dict``/``from_dict`` for flat dataclasses, so configs can be written into artifacts."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class ExtractConfig(_Dict):
    """Settings of one ``ssvt extract`` run.

    ``layers`` is "last", "last4" or comma-separated block indices ("8,9,10,11"). ``random_init``
    builds the backbone without pretrained weights (tests, the offline demo); ``overrides`` change
    the architecture (tests build ``{"num_hidden_layers": 2}`` models).
    """

    model: str = "dinov2_vitl14"
    size: int = 448
    layers: str = "last"
    flip: bool = False
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    workers: int = 2
    device: str = "auto"
    images_per_shard: int | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % PATCH:
            raise ConfigError(
                f"--size must be a positive multiple of {PATCH}, got {self.size} "
                f"(try {round(self.size / PATCH) * PATCH or PATCH})"
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {self.workers}")
        if self.images_per_shard is not None and self.images_per_shard < 1:
            raise ConfigError(f"images per shard must be at least 1, got {self.images_per_shard}")
        if self.random_init and self.weights:
            raise ConfigError("--random-init and --weights exclude each other")

    @property
    def views(self) -> tuple[str, ...]:
        return ("original", "hflip") if self.flip else ("original",)

    @property
    def cache_name(self) -> str:
        """Folder name of this config's cache: ``<model>-<size>-<layers>`` (+ ``-random`` without weights)."""
        layers = self.layers.replace(",", "_").replace(" ", "")
        suffix = "-random" if self.random_init else ""
        return f"{self.model}-{self.size}-{layers}{suffix}"


SCHEDULES = ("cosine", "poly")


@dataclass(frozen=True)
class TrainConfig(_Dict):
    """Settings of one ``ssvt train-head`` run (AdamW, linear warm-up, then cosine or poly decay).

    Training runs ``epochs`` passes over the labelled images, or more when that is fewer than
    ``min_steps`` optimiser steps (small datasets). ``pixels_per_image`` trains dense labels on a
    random subset of labelled pixels per image (None: all); sparse labels always use only their
    labelled pixels. ``flip`` uses the cached flipped view as augmentation when the store has one.
    ``memory`` is "auto" (features in RAM or GPU memory when they fit, else streamed); "ram" and
    "stream" force one path (tests and benchmarks; the CLI never asks the user).
    """

    labels: str = "gt"
    head: str = "bn-linear"
    epochs: int = 30
    min_steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    schedule: str = "poly"
    pixels_per_image: int | None = None
    flip: bool = True
    seed: int = 0
    device: str = "auto"
    memory: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.min_steps < 0:
            raise ConfigError(f"epochs and batch size must be at least 1, got {self.epochs} and {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"learning rate must be positive and weight decay non-negative, got {self.lr}, {self.weight_decay}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warm-up is a fraction of training in [0, 1), got {self.warmup}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.pixels_per_image is not None and self.pixels_per_image < 1:
            raise ConfigError(f"pixels per image must be at least 1, got {self.pixels_per_image}")
        if self.memory not in ("auto", "ram", "stream"):
            raise ConfigError(f"memory must be auto, ram or stream, got {self.memory!r}")


@dataclass(frozen=True)
class LabelSource:
    """A named label source of the workspace: its kind and where its files are."""

    name: str
    kind: str
    path: Path
    background: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise ConfigError(f"label source {self.name!r} has kind {self.kind!r}; valid kinds are {', '.join(LABEL_KINDS)}")


@dataclass(frozen=True)
class Workspace:
    """The parsed ``ssvt.toml``: dataset, cache and run folders, and named label sources.

    Relative paths in the file are relative to the file's folder.
    """

    file: Path
    data_root: Path
    data_format: str = "voc"
    splits: tuple[str, ...] = ("train", "val")
    train_split: str = "train"
    val_split: str | None = "val"
    num_classes: int = 21
    cache_dir: Path = Path("cache")
    runs_dir: Path = Path("runs")
    labels: dict[str, LabelSource] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Workspace:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no workspace file at {path}; run `ssvt init` or `ssvt make-toy DIR` to write one") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_toml(raw, path)

    @classmethod
    def from_toml(cls, raw: dict[str, Any], path: Path) -> Workspace:
        base = path.resolve().parent
        ds = raw.get("dataset", {})
        paths = raw.get("paths", {})
        if "root" not in ds:
            raise ConfigError(f"{path}: [dataset] needs `root` (a VOC root or an image folder)")
        fmt = ds.get("format", "voc")
        if fmt not in DATA_FORMATS:
            raise ConfigError(f"{path}: [dataset] format = {fmt!r}; valid formats are {', '.join(DATA_FORMATS)}")
        labels = {}
        for name, entry in raw.get("labels", {}).items():
            if "kind" not in entry or "path" not in entry:
                raise ConfigError(f"{path}: [labels.{name}] needs `kind` and `path`")
            bg = entry.get("background")
            labels[name] = LabelSource(name, entry["kind"], base / entry["path"], base / bg if bg else None)
        if "gt" not in labels and (masks := default_masks(base / ds["root"], fmt)) is not None:
            labels["gt"] = LabelSource("gt", "mask", masks)
        return cls(
            file=path.resolve(),
            data_root=base / ds["root"],
            data_format=fmt,
            splits=tuple(ds.get("splits", ("train", "val"))),
            train_split=ds.get("train_split", "train"),
            val_split=ds.get("val_split", "val") or None,
            num_classes=int(ds.get("num_classes", 21)),
            cache_dir=base / paths.get("cache", "cache"),
            runs_dir=base / paths.get("runs", "runs"),
            labels=labels,
        )

    @classmethod
    def find(cls, explicit: str | Path | None = None) -> Workspace | None:
        """The workspace named by ``--config``, else ``./ssvt.toml`` when present, else None."""
        if explicit is not None:
            return cls.load(explicit)
        default = Path.cwd() / WORKSPACE_FILE
        return cls.load(default) if default.is_file() else None

    def store_path(self, cfg: ExtractConfig, split: str) -> Path:
        return self.cache_dir / cfg.cache_name / f"{split}.zarr"

    def find_store(self, split: str, features: str | None = None) -> Path:
        """The cached store of ``split``: ``<cache>/<features>/<split>.zarr``, or the only cache that
        has this split when ``features`` is None."""
        if features is not None:
            path = self.cache_dir / features / f"{split}.zarr"
            if not path.exists():
                raise ConfigError(f"no store {path}; run `ssvt extract` first or check --features")
            return path
        found = sorted(self.cache_dir.glob(f"*/{split}.zarr"))
        if not found:
            raise ConfigError(f"no cached features for split {split!r} under {self.cache_dir}; run `ssvt extract` first")
        if len(found) > 1:
            names = ", ".join(p.parent.name for p in found)
            raise ConfigError(f"several caches have split {split!r} ({names}); choose one with --features NAME")
        return found[0]

    def label_source(self, name: str) -> LabelSource:
        if name not in self.labels:
            known = ", ".join(sorted(self.labels)) or "none"
            raise ConfigError(f"no label source {name!r} in {self.file}; known: {known}")
        return self.labels[name]


def default_masks(root: Path, fmt: str) -> Path | None:
    """The dataset's own ground-truth masks, used as label set ``gt`` when the workspace names none:
    ``SegmentationClassAug/`` when present, else ``SegmentationClass/`` (VOC), or ``masks/`` beside
    ``images/`` (folder datasets)."""
    candidates = ("SegmentationClassAug", "SegmentationClass") if fmt == "voc" else ("masks",)
    return next((root / c for c in candidates if (root / c).is_dir()), None)


def optional_label_source(name_or_path: str | None, workspace: Workspace | None) -> LabelSource | None:
    """Like :func:`label_source`, but None (instead of an error) when neither a workspace label set
    nor a path of that name exists: for optional ground truth."""
    if name_or_path is None:
        return None
    known = workspace is not None and name_or_path in workspace.labels
    return label_source(name_or_path, workspace) if known or Path(name_or_path).exists() else None


def label_source(name_or_path: str, workspace: Workspace | None, kind: str | None = None) -> LabelSource:
    """A workspace label source by name, or a path with its kind (guessed from the path when not given:
    a folder of masks, a .json of points, a .npy of image-level labels)."""
    if workspace is not None and name_or_path in workspace.labels:
        return workspace.labels[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        known = ", ".join(sorted(workspace.labels)) if workspace else "none (no ssvt.toml here)"
        raise ConfigError(f"{name_or_path!r} is neither a label source of the workspace (known: {known}) nor a path")
    if kind is None:
        kind = {".json": "points-json", ".npy": "cls-labels"}.get(path.suffix, "mask")
    return LabelSource(path.stem, kind, path.resolve())


INIT_TEMPLATE = """\
# ssvt workspace: the dataset, where caches and runs go, and the label sources by name.
# Relative paths are relative to this file. Every setting can also be given as a command-line flag.

[dataset]
# A VOC root (the folder holding JPEGImages/, SegmentationClass/, ImageSets/Segmentation/),
# a folder with images/ (+ masks/) paired by file stem, or a plain folder of images.
root = "VOCdevkit/VOC2012"
format = "voc"                  # voc | folder | list
splits = ["train_aug", "val"]   # ImageSets/Segmentation/<split>.txt; `ssvt extract` caches each
train_split = "train_aug"
val_split = "val"
num_classes = 21

[paths]
cache = "cache"                 # feature stores: cache/<model>-<size>-<layers>/<split>.zarr
runs = "runs"                   # one folder per `ssvt train-head` run

# Label sources, used by `ssvt train-head --labels NAME`. Kinds: mask (palette or single-channel PNGs,
# 255 = ignore), rgb-mask, scribble-xml (ScribbleSup), scribble-png, points-json ("What's the Point",
# optional `background` file), cls-labels (cls_labels.npy). Without a [labels.gt] entry, `gt` is the
# dataset's SegmentationClassAug/ when present, else SegmentationClass/ (or masks/ for folders).
[labels.gt]
kind = "mask"
path = "VOCdevkit/VOC2012/SegmentationClassAug"

# [labels.scribble]
# kind = "scribble-xml"
# path = "scribble_annotation/pascal_2012"

# [labels.point]
# kind = "points-json"
# path = "whats_the_point/pascal2012_trainval_main.json"
# background = "whats_the_point/pascal2012_trainval_bg.json"

# [labels.eps]
# kind = "mask"
# path = "EPS/result/cam_png"
"""

#: The workspace `ssvt make-toy` writes next to its data (the label sources of the toy).
TOY_WORKSPACE = """\
# ssvt workspace (written by `ssvt make-toy`): the dataset, where caches and runs go, and the label sources.
# Relative paths are relative to this file.

[dataset]
root = "VOC2012"                # a VOC root: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/
format = "voc"
splits = ["train", "val"]       # ImageSets/Segmentation/<split>.txt
train_split = "train"
val_split = "val"
num_classes = 21

[paths]
cache = "cache"                 # feature stores
runs = "runs"                   # one folder per training run

# Label sources by name (`--labels NAME`). Kinds: mask (PNG class ids, 255 = ignore), scribble-xml
# (ScribbleSup), points-json ("What's the Point", + background clicks), cls-labels (cls_labels.npy).
[labels.gt]
kind = "mask"                   # the full ground truth: the upper bound
path = "VOC2012/SegmentationClass"

[labels.scribble]
kind = "scribble-xml"           # one stroke per object and 1-2 background strokes, short tags
path = "labels/scribbles"

[labels.point]
kind = "points-json"            # one click per object ...
path = "labels/points.json"
background = "labels/points_bg.json"   # ... plus 1-2 background clicks

[labels.seam]
kind = "mask"                   # SEAM-like pseudo-masks from image-level labels (poorer)
path = "labels/pseudo_seam"

[labels.eps]
kind = "mask"                   # EPS-like pseudo-masks (better)
path = "labels/pseudo_eps"

[labels.vl]
kind = "mask"                   # zero-shot vision-language masks, 255 = low confidence
path = "labels/vl"

[labels.cls]
kind = "cls-labels"             # image-level labels: id -> 20 multi-hot, no background slot
path = "labels/cls_labels.npy"
"""
