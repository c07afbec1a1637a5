"""The names of everything ssvt keeps on disk, and what makes two feature stores the same.

Every other module asks here for a path instead of building one: where a split's store is, its
sibling splits, the label sets beside a store, a new run folder and the files in it. Roots are
``str | os.PathLike``; ``Path`` arithmetic stays inside this module. A store or cache root may also be
a URL (``s3://bucket/cache``, ``gs://...``; cache_layout.md, "Stores on object storage"):
:func:`location` turns it into a :class:`upath.UPath` (the optional ``ssvt[s3]`` extra), which has the
same ``/``, ``parent``, ``name``, ``exists`` and ``glob`` as a ``Path``; run folders stay local. Usage::

    layout = CacheLayout("cache", "runs")
    name = cache_name("dinov2_vitl14", 448, layers=(20, 21, 22, 23), depth=24)   # dinov2_vitl14-448-last4
    train = layout.store_path(name, "train_aug")     # cache/dinov2_vitl14-448-last4/train_aug.zarr
    val = sibling_store(train, "val")                # cache/dinov2_vitl14-448-last4/val.zarr
    label_set_path(train, "eps")                     # cache/dinov2_vitl14-448-last4/train_aug.labels.eps.h5
    run = RunFiles(layout.new_run_dir("eps-bn-linear"))   # runs/eps-bn-linear[-n]/
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from upath import UPath

#: Where a store, a label set or a cache folder is: a local ``Path``, or a ``UPath`` for a URL.
Location: TypeAlias = "Path | UPath"
StrPath = str | os.PathLike[str]
#: What callers pass for a store, a label set or a cache root: a string (a local path or a URL), an
#: ``os.PathLike`` or a :data:`Location`.
StorePath: TypeAlias = "str | os.PathLike[str] | Path | UPath"

STORE_SUFFIX = ".zarr"
LABEL_SET_INFIX, LABEL_SET_SUFFIX = ".labels.", ".h5"


class ImageStatus(IntEnum):
    """The per-image status byte of a feature store (array ``status``, cache_layout.md)."""

    MISSING = 0  # not written yet
    OK = 1
    FAILED = 2  # the image could not be decoded; its features are zero

    @property
    def text(self) -> str:
        return {0: "not written", 1: "ok", 2: "failed to decode (features zero)"}[self.value]


# --- cache folders and stores --------------------------------------------------------------------


def layers_name(layers: Sequence[int], depth: int) -> str:
    """The canonical spelling of resolved block indices: ``last``, ``lastN`` for the last N blocks in
    order, else the indices joined by ``_``. ``last4`` and ``20,21,22,23`` on a 24-block ViT-L give
    one name, so they share one cache."""
    layers = list(layers)
    n = len(layers)
    if n and layers == list(range(depth - n, depth)):
        return "last" if n == 1 else f"last{n}"
    return "_".join(str(i) for i in layers)


def cache_name(model: str, size: int, layers: Sequence[int], depth: int, random_init: bool = False) -> str:
    """Folder name of a cache: ``<model>-<size>-<layers>``, plus ``-random`` for a random init."""
    return f"{model}-{size}-{layers_name(layers, depth)}" + ("-random" if random_init else "")


def legacy_cache_name(model: str, size: int, layers_text: str, random_init: bool = False) -> str:
    """The name ssvt 0.1 gave a cache: the ``--layers`` text as typed (``8,9,10,11`` -> ``8_9_10_11``).
    Still looked for, so stores written by 0.1 are found."""
    layers = layers_text.replace(",", "_").replace(" ", "")
    return f"{model}-{size}-{layers}" + ("-random" if random_init else "")


# --- locations: local paths and URLs ----------------------------------------------------------------


def is_url(path: object) -> bool:
    """True for a URL with a scheme of two or more letters (``s3://b/k``, ``file:///x``); a Windows
    drive (``C:/x``) or a plain path is not one."""
    if not isinstance(path, str):  # a UPath of a URL has a protocol; Path and a local UPath have none
        return getattr(path, "protocol", "") not in ("", "file", "local")
    scheme = urlsplit(path).scheme
    return len(scheme) > 1 and path.startswith(f"{scheme}://")


def location(path: StorePath) -> Location:
    """A store, label set or cache root as this layer handles it: a local ``Path``, or a ``UPath`` for a
    URL on object storage (``s3://bucket/cache``; fsspec's filesystems, so ``gs://`` with gcsfs too).
    ``file://`` URLs are local paths (and get the direct shard reader). Credentials come from the
    environment and the tools' config files only: a URL that carries them is refused."""
    if not is_url(path):
        return path if isinstance(path, Path) else Path(path if isinstance(path, str | os.PathLike) else str(path))
    text = str(path)
    parts = urlsplit(text)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{parts.scheme}://{parts.hostname}/...: credentials in a URL are refused (they would be written into "
            "run folders and logs); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or use ~/.aws/credentials"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"{text}: a store URL takes no query or fragment; set options in the environment")
    if parts.scheme == "file":
        return Path(parts.path)
    try:
        from upath import UPath
    except ImportError:
        raise ConfigError(f"{text}: stores on object storage need the s3 extra: pip install 'ssvt[s3]'") from None
    try:
        remote = UPath(text, use_listings_cache=False)  # other processes write the store: never trust a cached listing
        remote.fs  # noqa: B018 -- make the filesystem now, so that a missing package is reported here
    except (ImportError, ValueError) as exc:  # fsspec names the package a protocol needs (gcsfs for gs://)
        raise ConfigError(f"{text}: {exc}") from None
    return remote


def local_only(path: StrPath, what: str) -> Path:
    """``path`` as a local ``Path``; a URL is refused with a one-line error naming ``what`` it is for."""
    where = location(path)
    if not isinstance(where, Path):
        raise ConfigError(f"{what} must be a local folder, got the URL {path}; only stores and caches may be URLs")
    return where


def sibling_store(store_path: StorePath, split: str) -> Location:
    """The store of ``split`` in the same cache folder as ``store_path`` (e.g. val next to train)."""
    return location(store_path).parent / f"{split}{STORE_SUFFIX}"


def label_set_path(store_path: StorePath, name: str) -> Location:
    """``<store folder>/<store stem>.labels.<name>.h5``, e.g. ``cache/m-448-last/train.labels.eps.h5``."""
    path = location(store_path)
    return path.parent / f"{path.stem}{LABEL_SET_INFIX}{name}{LABEL_SET_SUFFIX}"


def label_set_paths(store_path: StorePath) -> dict[str, Location]:
    """The label sets imported for a store: name -> path, sorted by name."""
    path = location(store_path)
    prefix = f"{path.stem}{LABEL_SET_INFIX}"
    found: list[Location] = sorted(path.parent.glob(f"{prefix}*{LABEL_SET_SUFFIX}"), key=str)
    return {p.name[len(prefix) : -len(LABEL_SET_SUFFIX)]: p for p in found}


class CacheLayout:
    """The cache and runs roots of a workspace, and the names under them."""

    def __init__(self, cache: StorePath, runs: StrPath = "runs") -> None:
        self.cache = location(cache)  # a local folder or a URL
        self.runs = local_only(runs, "the runs folder")

    def __repr__(self) -> str:
        return f"CacheLayout(cache={str(self.cache)!r}, runs={str(self.runs)!r})"

    def store_path(self, name: str, split: str, *, legacy_name: str | None = None) -> Location:
        """``<cache>/<name>/<split>.zarr``; a store that ssvt 0.1 wrote under ``legacy_name`` is
        returned instead when only it exists."""
        path = self.cache / name / f"{split}{STORE_SUFFIX}"
        if legacy_name and legacy_name != name and not path.exists():
            legacy = self.cache / legacy_name / f"{split}{STORE_SUFFIX}"
            if legacy.exists():
                return legacy
        return path

    def find_store(self, split: str, name: str | None = None) -> Location:
        """The store of ``split`` in cache folder ``name``, or in the only cache folder that has this
        split when ``name`` is None."""
        if name is not None:
            path = self.cache / name / f"{split}{STORE_SUFFIX}"
            if not path.exists():
                raise ConfigError(f"no store {path}; run `ssvt extract` first or check --features")
            return path
        found: list[Location] = sorted(self.cache.glob(f"*/{split}{STORE_SUFFIX}"), key=str)
        if not found:
            raise ConfigError(f"no cached features for split {split!r} under {self.cache}; run `ssvt extract` first")
        if len(found) > 1:
            names = ", ".join(p.parent.name for p in found)
            raise ConfigError(f"several caches have split {split!r} ({names}); choose one with --features NAME")
        return found[0]

    def run_dir(self, stem: str) -> Path:
        """``<runs>/<stem>``, whether or not it exists (a run that is meant to be replaced)."""
        return self.runs / stem

    def ablation_dir(self, name: str) -> Path:
        """``ablations/<name>`` beside the runs folder: one ``ssvt ablate`` grid (:class:`AblationFiles`)."""
        return self.runs.parent / "ablations" / name

    def new_run_dir(self, stem: str) -> Path:
        """``<runs>/<stem>``, or ``<stem>-2``, ``-3`` ... when taken."""
        path, n = self.runs / stem, 1
        while path.exists():
            n += 1
            path = self.runs / f"{stem}-{n}"
        return path


def run_stem(labels: str, head: str) -> str:
    """The default name of a run folder: ``<label source>-<head>``."""
    return f"{labels}-{head}"


class RunFiles:
    """The files of one ``train-head`` run folder (README, "Runs")."""

    def __init__(self, run_dir: StrPath) -> None:
        self.dir = local_only(run_dir, "a run folder")
        self.head = self.dir / "head.safetensors"
        self.backbone = self.dir / "backbone.safetensors"  # the tuned backbone of an `ssvt finetune` run
        self.config = self.dir / "config.json"
        self.history = self.dir / "history.json"
        self.metrics_csv = self.dir / "metrics.csv"  # the history, one row per step, written as training goes
        self.tensorboard = self.dir / "tb"  # TensorBoard event files (train-head --tensorboard)
        self.curve = self.dir / "curve.png"
        self.metrics = self.dir / "metrics.json"
        self.confusion = self.dir / "confusion.npy"
        self.confusion_figure = self.dir / "confusion.png"
        self.log = self.dir / "train.log"

    def is_run(self) -> bool:
        return self.config.is_file()

    def metrics_for(self, protocol: str) -> Path:
        """metrics.json for the cached proxy ("cache"), metrics.<protocol>.json for lin and ms."""
        return self._for(self.metrics, protocol)

    def confusion_for(self, protocol: str) -> Path:
        return self._for(self.confusion, protocol)

    def confusion_figure_for(self, protocol: str) -> Path:
        return self._for(self.confusion_figure, protocol)

    def worst_for(self, protocol: str) -> Path:
        """worst.png: the images with the lowest mIoU (worst.<protocol>.png for lin and ms)."""
        return self._for(self.dir / "worst.png", protocol)

    @staticmethod
    def _for(path: Path, protocol: str) -> Path:
        return path if protocol == "cache" else path.with_name(f"{path.stem}.{protocol}{path.suffix}")


class AblationFiles:
    """The files of one ``ssvt ablate`` grid folder (README, "Ablations")."""

    def __init__(self, root: StrPath) -> None:
        self.dir = local_only(root, "an ablation folder")
        self.cells = self.dir / "cells"  # one train-head run folder per cell, named after the cell
        self.grid = self.dir / "grid.json"  # the grid's settings, to refuse resuming with others
        self.results_csv = self.dir / "results.csv"
        self.results_json = self.dir / "results.json"
        self.table_md = self.dir / "table.md"
        self.table_png = self.dir / "table.png"
        self.failures = self.dir / "failed.json"

    def cell(self, name: str) -> Path:
        return self.cells / name


# --- identity ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreIdentity:
    """What a feature store's tokens are: the one definition used to resume, to match a head to a
    store, and to fingerprint a store for the label sets and runs made from it."""

    backbone: str
    weights_sha256: str | None
    layers: tuple[int, ...]
    size: int
    grid: tuple[int, int]
    channels: int
    views: tuple[str, ...]

    #: Hashed into the fingerprint, with the image ids (grid and channels follow from these; the
    #: set is the one ssvt 0.1 hashed, so fingerprints of existing stores stay the same).
    FINGERPRINTED = ("backbone", "weights_sha256", "layers", "size", "views")
    #: What a trained head depends on: views and images may differ between its training and test stores.
    #: Heads are fully convolutional on the token grid, so size and grid may differ too.
    FOR_HEADS = ("backbone", "weights_sha256", "layers", "channels")

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreIdentity:
        """From a store's attributes (or anything with the same keys)."""
        return cls(
            backbone=attrs["backbone"], weights_sha256=attrs.get("weights_sha256"), layers=tuple(attrs["layers"]),
            size=int(attrs["size"]), grid=(int(attrs["grid"][0]), int(attrs["grid"][1])), channels=int(attrs["channels"]),
            views=tuple(attrs["views"]),
        )  # fmt: skip

    def as_json(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """The identity (or ``keys`` of it) as plain JSON values, tuples as lists."""
        full = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return full if keys is None else {k: full[k] for k in keys}

    def for_heads(self) -> dict[str, Any]:
        """The part a trained head records and checks (``config.json`` of a run, ``store.identity``)."""
        return self.as_json(self.FOR_HEADS)

    def fingerprint(self, ids: Sequence[str]) -> str:
        """SHA-256 (hex) of the fingerprinted fields and the image ids; token bytes are not hashed,
        so two stores of the same inputs share a fingerprint."""
        identity = {**self.as_json(self.FINGERPRINTED), "ids": list(ids)}
        blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def differences(self, other: StoreIdentity, *, ours: str, theirs: str) -> list[str]:
        """``key: <ours> X, <theirs> Y`` for every field that differs from ``other``."""
        return identity_differences(self.as_json(), other.as_json(), ours=ours, theirs=theirs)


def identity_differences(ours_json: Mapping[str, Any], theirs_json: Mapping[str, Any], *, ours: str, theirs: str) -> list[str]:
    """``key: <ours> X, <theirs> Y`` for every key of ``ours_json`` whose value differs in ``theirs_json``."""
    differ = [k for k, v in ours_json.items() if _plain(v) != _plain(theirs_json.get(k))]
    return [f"{k}: {ours} {ours_json[k]!r}, {theirs} {theirs_json.get(k)!r}" for k in differ]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
