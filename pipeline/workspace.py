"""The ``ssvt.toml`` workspace: dataset, cache and runs folders, and named label sources.

Usage::

    ws = Workspace.load("ssvt.toml")        # or Workspace.find(None): the nearest ssvt.toml upwards
    ws.layout.find_store("val")             # cache/dinov2_vitl14-448-last/val.zarr
    ws.label_source("eps")                  # the source named [labels.eps] in the file
    label_source("labels/mine", ws)         # a name from the file, or a path whose kind is guessed

Label kinds are checked against their registry (:mod:`pipeline.cache.label_kinds`); an unknown key in
``ssvt.toml`` is an error naming the valid ones.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache.datasets import DATASET_CLASSES, MASK_MAPPINGS, folder_splits
from pipeline.cache.label_kinds import LabelSource, guess_kind
from pipeline.cache.names import CacheLayout, Location, is_url, local_only, location
from pipeline.errors import ConfigError

WORKSPACE_FILE = "ssvt.toml"
DATA_FORMATS = ("voc", "folder", "list", "ade20k", "cityscapes")

WORKSPACE_KEYS: dict[str, tuple[str, ...]] = {
    "dataset": ("root", "format", "splits", "train_split", "val_split", "num_classes", "classes"),
    "paths": ("cache", "runs"),
    "labels.*": ("kind", "path", "background", "mapping"),
}


def _check_keys(where: str, found: dict[str, Any], valid: tuple[str, ...] | list[str], file: Path) -> None:
    """ConfigError naming the first unknown key of a table, a close valid spelling, and the valid keys."""
    for key in found:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ConfigError(f"{file}: unknown key `{key}` in {where}{hint}; valid keys: {', '.join(valid)}")


def _check_workspace_keys(raw: dict[str, Any], file: Path) -> None:
    _check_keys("the file (sections)", raw, ["dataset", "paths", "labels"], file)
    for section in ("dataset", "paths", "labels"):
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{file}: `{section}` must be a table, [{section}]")
    _check_keys("[dataset]", raw.get("dataset", {}), WORKSPACE_KEYS["dataset"], file)
    _check_keys("[paths]", raw.get("paths", {}), WORKSPACE_KEYS["paths"], file)
    for name, entry in raw.get("labels", {}).items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{file}: labels.{name} must be a table, [labels.{name}] with kind and path")
        _check_keys(f"[labels.{name}]", entry, WORKSPACE_KEYS["labels.*"], file)


@dataclass(frozen=True)
class Workspace:
    """The parsed ``ssvt.toml``: dataset, cache and run folders, and named label sources.

    Relative paths in the file are relative to the file's folder. ``classes`` are the class names for
    reports and figures: ``classes`` of [dataset] (a list, or a ``classes.txt`` with one name a line),
    else the format's own (VOC, ADE20K, Cityscapes), else None (``class_0``, ``class_1``, ...); they
    set ``num_classes`` when it is not given. ADE20K's splits are ``training`` and ``validation``; a
    folder dataset without ``images/<split>/`` folders (or a list) has one split, ``train_split``.
    """

    file: Path
    data_root: Path
    data_format: str = "voc"
    splits: tuple[str, ...] = ("train", "val")
    train_split: str = "train"
    val_split: str | None = "val"
    num_classes: int = 21
    cache_dir: Location = Path("cache")  # a local folder, or a URL (s3://bucket/cache)
    runs_dir: Path = Path("runs")
    labels: dict[str, LabelSource] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None

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
        _check_workspace_keys(raw, path)
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
            labels[name] = LabelSource(name, entry["kind"], base / entry["path"], base / bg if bg else None, entry.get("mapping"))
        if "gt" not in labels and (masks := default_masks(base / ds["root"], fmt)) is not None:
            labels["gt"] = LabelSource("gt", "mask", masks, mapping=fmt if fmt in MASK_MAPPINGS else None)
        splits, train_split, val_split = _dataset_splits(ds, fmt, base / ds["root"], path)
        classes, num_classes = _dataset_classes(ds, fmt, base, path)
        return cls(
            file=path.resolve(),
            data_root=base / ds["root"],
            data_format=fmt,
            splits=splits,
            train_split=train_split,
            val_split=val_split,
            num_classes=num_classes,
            classes=classes,
            cache_dir=_cache_root(paths.get("cache", "cache"), base),
            runs_dir=_runs_root(paths.get("runs", "runs"), base, path),
            labels=labels,
        )

    @classmethod
    def find(cls, explicit: str | Path | None = None) -> Workspace | None:
        """The workspace named by ``--config``, else ``./ssvt.toml`` when present, else None."""
        if explicit is not None:
            return cls.load(explicit)
        default = Path.cwd() / WORKSPACE_FILE
        return cls.load(default) if default.is_file() else None

    @property
    def layout(self) -> CacheLayout:
        """The names under this workspace's cache and runs folders."""
        return CacheLayout(self.cache_dir, self.runs_dir)

    def label_source(self, name: str) -> LabelSource:
        if name not in self.labels:
            known = ", ".join(sorted(self.labels)) or "none"
            raise ConfigError(f"no label source {name!r} in {self.file}; known: {known}")
        return self.labels[name]


def _cache_root(value: str, base: Path) -> Location:
    """[paths] cache: a URL as it is (cache_layout.md, "Stores on object storage"), else relative to ``base``."""
    return location(value) if is_url(value) else base / value


def _runs_root(value: str, base: Path, file: Path) -> Path:
    """[paths] runs, relative to ``base``; run folders are local, so a URL other than ``file://`` is refused."""
    return local_only(value, f"{file}: [paths] runs") if is_url(value) else base / value


def default_masks(root: Path, fmt: str) -> Path | None:
    """The dataset's own ground-truth masks, used as label source ``gt`` when the workspace names none:
    ``SegmentationClassAug/`` when present, else ``SegmentationClass/`` (VOC), ``annotations/`` (ADE20K,
    read with reduce-zero-label), ``gtFine/`` (Cityscapes trainIds, mapped from labelIds when absent),
    or ``masks/`` beside ``images/`` (folder datasets, ``masks/<split>/`` with split folders)."""
    candidates = {"voc": ("SegmentationClassAug", "SegmentationClass"), "ade20k": ("annotations",), "cityscapes": ("gtFine",)}
    return next((root / c for c in candidates.get(fmt, ("masks",)) if (root / c).is_dir()), None)


def _dataset_splits(ds: dict[str, Any], fmt: str, root: Path, file: Path) -> tuple[tuple[str, ...], str, str | None]:
    """(splits, train_split, val_split) of [dataset]. A dataset without split folders (a list, a folder
    with no ``images/<split>/``) has one split: naming several is an error, as they would be the same images."""
    train_default, val_default = ("training", "validation") if fmt == "ade20k" else ("train", "val")
    single = fmt == "list" or (fmt == "folder" and root.is_dir() and not folder_splits(root))
    train = str(ds.get("train_split", train_default))
    val = ds.get("val_split", None if single else val_default) or None
    splits = tuple(ds.get("splits", (train,) if single else (train_default, val_default)))
    named = sorted({*splits, train, *([val] if val else [])})
    if single and len(named) > 1:
        raise ConfigError(
            f"{file}: [dataset] names the splits {', '.join(named)}, but {root} has no per-split folders, so every "
            "split would be the same images; put each split's images in images/<split>/ (and masks in masks/<split>/), "
            f'or name one split (splits = ["{train}"], no val_split)'
        )
    return splits, train, val


def _dataset_classes(ds: dict[str, Any], fmt: str, base: Path, file: Path) -> tuple[tuple[str, ...] | None, int]:
    """(class names or None, num_classes) of [dataset]: ``classes`` (a list or a classes.txt path), else
    the format's own names; ``num_classes`` must agree with them (a VOC-layout dataset of another
    number of classes keeps unnamed classes)."""
    given = ds.get("classes")
    if isinstance(given, str):
        try:
            names = tuple(line.strip() for line in (base / given).read_text().splitlines() if line.strip())
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read [dataset] classes = {given!r}: {exc.strerror or exc}") from None
    elif given is None:
        names = DATASET_CLASSES.get(fmt, ())
    elif isinstance(given, list) and all(isinstance(n, str) for n in given):
        names = tuple(given)
    else:
        raise ConfigError(f"{file}: [dataset] classes must be a list of names or the path of a classes.txt, got {given!r}")
    if given is not None and not names:
        raise ConfigError(f"{file}: [dataset] classes = {given!r} names no class; one name a line, in class-id order")
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"{file}: [dataset] classes repeats {dupes[:5]}; give each class its own name")
    if "num_classes" not in ds:
        return names or None, len(names) or 21
    num_classes = int(ds["num_classes"])
    if names and num_classes != len(names):
        if given is None and fmt == "voc":
            return None, num_classes
        source = f"classes ({given})" if isinstance(given, str) else "classes" if given else f"format {fmt!r}"
        raise ConfigError(
            f"{file}: [dataset] num_classes = {num_classes} but {source} names {len(names)} classes; "
            "drop num_classes or make them agree"
        )
    return names or None, num_classes


def optional_label_source(name_or_path: str | None, workspace: Workspace | None) -> LabelSource | None:
    """Like :func:`label_source`, but None (instead of an error) when neither a workspace label source
    nor a path of that name exists: for optional ground truth."""
    if name_or_path is None or name_or_path.strip().lower() in ("", "none"):
        return None  # `--gt none`: no ground truth
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
    return LabelSource(path.stem, kind or guess_kind(path), path.resolve())
