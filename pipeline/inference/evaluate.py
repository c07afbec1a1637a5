"""``ssvt evaluate RUN [RUN ...] --protocol cache|lin|ms``: score many runs, each backbone pass shared.

Usage::

    results = evaluate_runs(["runs/gt-bn-linear", "runs/eps-bn-linear"], ws.labels["gt"], protocol="lin", workspace=ws)
    results[0].result.miou          # also in runs/gt-bn-linear/metrics.lin.json (+ confusion.lin.*, worst.lin.png)

"cache" scores each run on its cached val store (:func:`pipeline.training.evaluate.evaluate`, metrics.json).
"lin" and "ms" run the official DINOv2 test pipelines (:mod:`pipeline.inference.protocols`) with the
frozen backbone online and write nothing but results. Runs whose backbone and weights agree form one
group; each group's images go through the backbone once, for the union of its runs' layers, and every
run's head reads its own blocks from the same tokens.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.geometry import fit_geometry
from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.names import RunFiles, StrPath, sibling_store
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig
from pipeline.devices import pick_device
from pipeline.errors import ConfigError, LabelError, StoreError, StoreMismatchError
from pipeline.features.backbones import Backbone, resolve_layers
from pipeline.features.data import ImageItem, find_images
from pipeline.features.extract import load_backbone
from pipeline.heads import SegHead
from pipeline.inference.online import OnlinePredictor
from pipeline.inference.protocols import CACHE, get_protocol
from pipeline.training.evaluate import WORST_IMAGES, EvalResult, evaluate, load_run, score_image, write_metrics
from pipeline.training.metrics import Scorer
from pipeline.workspace import Workspace

log = logging.getLogger(__name__)

#: Called with (run group, images done, images in the group).
GroupProgress = Callable[[str, int, int], None]


@dataclass
class RunEvaluation:
    run_dir: Path
    result: EvalResult


@dataclass
class LoadedRun:
    """A run folder's head with what the online protocols need to rebuild its backbone."""

    run_dir: Path
    head: SegHead
    config: dict[str, Any]
    extract: ExtractConfig
    layers: tuple[int, ...]

    @property
    def weights_sha256(self) -> str | None:
        """The backbone weights the head was trained with: the tuned ones of a finetune run, else the store's."""
        tuned = (self.config.get("finetune") or {}).get("backbone_sha256")
        return tuned or self.config["store"]["identity"].get("weights_sha256")

    def group_key(self) -> str:
        """Runs with equal keys share one backbone pass."""
        e = self.extract
        return json.dumps([e.model, self.weights_sha256, e.overrides, e.random_init, e.seed, e.weights], sort_keys=True)


def load_for_protocol(run_dir: StrPath, weights: str | None = None) -> LoadedRun:
    """The head of ``run_dir`` and the extract settings of the store it was trained on; a finetune run's
    backbone weights are its own ``backbone.safetensors`` (``weights`` is then ignored)."""
    head, config = load_run(run_dir)
    settings = dict(config["store"].get("extract_config") or _store_extract_config(config["store"]["path"], run_dir))
    tuned = RunFiles(run_dir).backbone
    if tuned.is_file():
        weights = str(tuned)
    if weights is not None:
        settings.update(weights=weights, random_init=False)
    extract = ExtractConfig.from_dict(settings)
    layers = tuple(config["store"]["identity"]["layers"])
    return LoadedRun(Path(run_dir), head, config, extract, layers)


def _store_extract_config(path: str, run_dir: StrPath) -> dict[str, Any]:
    """The extract settings recorded by the training store (runs written before they were copied into config.json)."""
    try:
        attrs = FeatureStore.open(path).attrs
    except StoreError:
        raise ConfigError(
            f"{run_dir} was trained on {path}, which cannot be opened; the lin/ms protocols need its backbone settings"
        ) from None
    return dict(attrs.get("extract_config") or {"model": attrs["backbone"]})


def protocol_items(run: LoadedRun, *, data: StrPath | None, split: str, workspace: Workspace | None) -> list[ImageItem]:
    """The images to score: ``data`` (with ``split``), else those of the run's cached ``split`` store,
    else the workspace dataset's ``split``."""
    if data is not None:
        return find_images(Path(data), split)
    val = sibling_store(run.config["store"]["path"], split)
    if FeatureStore.exists(val):
        store = FeatureStore.open(val)
        if store.sources is not None:
            return [ImageItem(i, Path(s)) for i, s in zip(store.ids, store.sources, strict=True)]
    if workspace is not None:
        return find_images(workspace.data_root, split, workspace.data_format)
    raise ConfigError(f"no images for split {split!r}: pass --data PATH, or run in the workspace the run was trained in")


def _backbone(run: LoadedRun) -> Backbone:
    backbone = load_backbone(run.extract)
    if run.weights_sha256 and backbone.fingerprint != run.weights_sha256:
        tuned = run.extract.weights == str(RunFiles(run.run_dir).backbone)
        fix = "the file changed since fine-tuning; fine-tune again" if tuned else "pass --weights with the right file"
        raise StoreMismatchError(
            f"the weights found for {run.extract.model} ({backbone.weights_source}) are not the ones {run.run_dir} was "
            f"trained on (SHA-256 differs); {fix}"
        )
    return backbone


def evaluate_group(
    runs: Sequence[LoadedRun],
    items: Sequence[ImageItem],
    gt: LabelSource,
    protocol: str,
    *,
    device: str = "auto",
    batch_size: int = 8,
    workers: int = 2,
    save_predictions: Sequence[Path | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[EvalResult], int]:
    """Score runs that share a backbone under ``protocol``; returns their results and the number of
    windows the backbone ran (one pass for all runs). ``save_predictions`` has one folder (or None) per run."""
    gt.require_dense("evaluation")
    spec, dev = get_protocol(protocol), pick_device(device)
    backbone = _backbone(runs[0])
    heads = [(run.head, resolve_layers(list(run.layers), backbone.depth)) for run in runs]
    predictor = OnlinePredictor(backbone, heads, spec, dev, batch_size=batch_size, workers=workers)
    reader = gt.reader(runs[0].head.num_classes)  # masks are read once; each scorer checks its class count
    scorers = [Scorer(run.head.num_classes, keep_worst=WORST_IMAGES) for run in runs]
    folders = list(save_predictions) if save_predictions is not None else [None] * len(runs)
    for folder in folders:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    began = time.perf_counter()
    for out in predictor.run(items, progress):
        # the image at its own size (canvas = longer side): only its height and width check the mask
        found = None if out.error else reader.original(out.item.id, fit_geometry(*out.size, max(out.size)))
        if found is None:
            skipped.append(out.item.id)
            continue
        for probs, scorer, folder in zip(out.probs, scorers, folders, strict=True):
            score_image(scorer, out.item.id, probs.argmax(0).to(torch.uint8).cpu().numpy(), *found, folder)
    if len(skipped) == len(items):
        raise LabelError(f"no ground truth in {gt.path} for any of the {len(items)} images; do the ids match?")
    seconds = time.perf_counter() - began
    paths = {item.id: str(item.path) for item in items}
    results = []
    for run, scorer in zip(runs, scorers, strict=True):
        result = EvalResult.from_scorer(
            scorer, skipped=skipped, seconds=seconds, protocol=protocol, flip_tta=spec.flip, names=run.config.get("classes")
        )
        result.image_paths = {w.id: paths[w.id] for w in result.worst}
        results.append(result)
    return results, predictor.windows_run


def prediction_folder(root: Path | None, run_dir: StrPath, n_runs: int) -> Path | None:
    """Where one run's predictions go: ``root`` itself for a single run, ``root/<run name>`` for several."""
    if root is None:
        return None
    return root / Path(run_dir).name if n_runs > 1 else root


def evaluate_runs(
    run_dirs: Sequence[StrPath],
    gt: LabelSource,
    *,
    protocol: str = CACHE,
    workspace: Workspace | None = None,
    store_path: StrPath | None = None,
    data: StrPath | None = None,
    split: str = "val",
    weights: str | None = None,
    flip_tta: bool = False,
    save_predictions: Path | None = None,
    device: str = "auto",
    batch_size: int = 8,
    workers: int = 2,
    progress: GroupProgress | None = None,
) -> list[RunEvaluation]:
    """Evaluate every run under ``protocol`` and write its metrics files (see the module docstring)."""
    if not run_dirs:
        raise ConfigError("name at least one run folder")
    for run_dir in run_dirs:
        if not RunFiles(run_dir).is_run():
            raise ConfigError(f"{run_dir} is not a train-head run folder (no config.json)")
    if protocol == CACHE:
        out = []
        for run_dir in run_dirs:
            folder = prediction_folder(save_predictions, run_dir, len(run_dirs))
            tick = (lambda d, t, name=Path(run_dir).name: progress(name, d, t)) if progress else None
            result = evaluate(run_dir, gt, store_path=store_path, val_split=split, flip_tta=flip_tta,
                              save_predictions=folder, device=device, progress=tick)  # fmt: skip
            out.append(RunEvaluation(Path(run_dir), result))
        return out
    get_protocol(protocol)
    if store_path is not None or flip_tta:
        raise ConfigError(
            f"--store and --flip-tta belong to --protocol cache; {protocol} reads images and flips as its config says"
        )
    runs = [load_for_protocol(r, weights) for r in run_dirs]
    groups: dict[str, list[LoadedRun]] = {}
    for run in runs:
        groups.setdefault(run.group_key(), []).append(run)
    done: dict[Path, EvalResult] = {}
    for members in groups.values():
        items = protocol_items(members[0], data=data, split=split, workspace=workspace)
        name = members[0].extract.model + (f" ({len(members)} runs)" if len(members) > 1 else "")
        tick = (lambda d, t, name=name: progress(name, d, t)) if progress else None
        folders = [prediction_folder(save_predictions, run.run_dir, len(runs)) for run in members]
        results, windows = evaluate_group(members, items, gt, protocol, device=device, batch_size=batch_size,
                                          workers=workers, save_predictions=folders, progress=tick)  # fmt: skip
        log.info("%s: %d images, %d backbone windows for %d runs", protocol, len(items), windows, len(members))
        for run, result in zip(members, results, strict=True):
            extra = {"settings": get_protocol(protocol).to_dict(), "images_from": str(data or f"split {split}")}
            write_metrics(RunFiles(run.run_dir), result, run.config, **extra, backbone_windows=windows, runs_in_pass=len(members))
            done[run.run_dir] = result
    return [RunEvaluation(run.run_dir, done[run.run_dir]) for run in runs]
