"""Score a trained head as papers do: one confusion matrix over the split at the original resolution.

Usage::

    result = evaluate("runs/eps-bn-linear", ws.labels["gt"], workspace=ws)   # the val split beside its training store
    result.miou, result.per_class_iou                                        # metrics.json and confusion.png written
    score_head(head, FeatureStore.open(store_path), gt)                        # a head in memory, nothing written

For each image the head's patch logits are upsampled to the canvas, the padding is removed and they
are resized to the original H x W (bilinear), then compared with the ground-truth mask read from its
original file (255 ignored). With ``flip_tta`` the flipped view's logits, flipped back, are averaged in.
This is the fast cached proxy ("cache"); the official test pipelines ("lin", "ms") run the backbone
online, see :mod:`pipeline.inference.evaluate`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.names import ImageStatus, RunFiles, StoreIdentity, StorePath, StrPath, identity_differences, sibling_store
from pipeline.cache.store import FeatureStore
from pipeline.cache.voc import CLASS_NAMES, palette
from pipeline.devices import pick_device
from pipeline.errors import ConfigError, DataError, LabelError, StoreError, StoreMismatchError
from pipeline.heads import SegHead, head_from_config
from pipeline.resample import canvas_to_original
from pipeline.training.metrics import Scored, Scorer

log = logging.getLogger(__name__)


#: Images shown in worst.png.
WORST_IMAGES = 6


@dataclass
class EvalResult:
    """One head's scores on one split under one protocol ("cache", "lin" or "ms")."""

    miou: float
    per_class_iou: dict[str, float | None]
    pixel_accuracy: float
    confusion: np.ndarray
    images: int
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    flip_tta: bool = False
    protocol: str = "cache"
    per_image_iou: dict[str, float | None] = field(default_factory=dict)
    worst: list[Scored] = field(default_factory=list)
    image_paths: dict[str, str] = field(default_factory=dict)  # of the worst images, for worst.png

    @classmethod
    def from_scorer(
        cls, scorer: Scorer, *, skipped: list[str], seconds: float, names: Sequence[str] | None = None, **extra: Any
    ) -> EvalResult:
        """The result of a finished scorer; ``names`` are the classes' names (a run's ``classes``)."""
        cm, names = scorer.cm, class_names(scorer.cm.num_classes, names)
        iou = {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, cm.iou(), strict=True)}
        return cls(
            miou=float(cm.miou()), per_class_iou=iou,
            pixel_accuracy=float(cm.pixel_accuracy()), confusion=cm.matrix.copy(), images=len(scorer.per_image),
            skipped=skipped, seconds=seconds, per_image_iou=scorer.per_image, worst=scorer.worst(), **extra,
        )  # fmt: skip


def class_names(num_classes: int, names: Sequence[str] | None = None) -> list[str]:
    """Names of ``num_classes`` classes: ``names`` (a workspace's ``classes``) when there are as many,
    else VOC's for 21 classes, else class_0, class_1, ..."""
    if names is not None and len(names) == num_classes:
        return list(names)
    return list(CLASS_NAMES) if num_classes == len(CLASS_NAMES) else [f"class_{i}" for i in range(num_classes)]


def load_run(run_dir: StrPath) -> tuple[SegHead, dict[str, Any]]:
    """The head and config of a ``train-head`` run folder."""
    files = RunFiles(run_dir)
    try:
        config = json.loads(files.config.read_text())
        state = load_file(str(files.head))
    except FileNotFoundError as exc:
        raise StoreError(f"{files.dir} is not a complete train-head run ({Path(exc.filename).name} missing)") from None
    head = head_from_config(config["head"])
    head.load_state_dict(state, strict=True)
    return head.eval(), config


def check_compatible(config: dict[str, Any], store: FeatureStore) -> None:
    """Refuse a store made with another backbone, weights or layers than the run's (heads are fully
    convolutional, so the store's size and grid may differ from the training store's)."""
    trained = {k: v for k, v in config["store"]["identity"].items() if k in StoreIdentity.FOR_HEADS}
    here = store.identity.for_heads()
    diffs = identity_differences(trained, here, ours="run has", theirs="store has")
    if diffs:
        raise StoreMismatchError(f"{store.path} does not match the features the head was trained on ({'; '.join(diffs)})")


def score_head(
    head: SegHead,
    store: FeatureStore,
    gt: LabelSource,
    *,
    flip_tta: bool = False,
    save_predictions: Path | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    names: Sequence[str] | None = None,
) -> EvalResult:
    """mIoU of ``head`` on ``store``'s images against the original-resolution masks of ``gt``;
    ``names`` name the classes in the result (default: VOC's for 21 classes, else class_i)."""
    gt.require_dense("evaluation")
    reader = gt.reader(head.num_classes)
    if flip_tta and store.n_views < 2:
        raise ConfigError(f"{store.path} has no flipped view: extract with --flip to use flip test-time augmentation")
    k = head.num_classes
    dev = pick_device(device)
    head = head.to(dev)
    scorer = Scorer(k, keep_worst=WORST_IMAGES)
    geoms, status, began, skipped = store.geometries(), store.status(), time.perf_counter(), []
    if save_predictions is not None:
        save_predictions.mkdir(parents=True, exist_ok=True)
    for start in range(0, store.n_images, 8):
        stop = min(start + 8, store.n_images)
        with torch.inference_mode():
            logits = head(torch.from_numpy(store.read_tokens(start, stop, view=0)).to(dev)).float()
            if flip_tta:  # the flipped view's logits, flipped back onto the original canvas
                flipped = torch.from_numpy(store.read_tokens(start, stop, view=1)).to(dev)
                logits = (logits + head(flipped).float().flip(-1)) / 2
        for j, index in enumerate(range(start, stop)):
            image_id = store.ids[index]
            found = reader.original(image_id, geoms[index]) if status[index] == ImageStatus.OK else None
            if found is None:
                skipped.append(image_id)
                continue
            pred = canvas_to_original(logits[j], geoms[index]).argmax(0).to(torch.uint8).cpu().numpy()
            score_image(scorer, image_id, pred, *found, save_predictions)
        if progress:
            progress(stop, store.n_images)
    if len(skipped) == store.n_images:
        raise LabelError(f"no ground truth in {gt.path} for any image of {store.path}; do the ids match?")
    result = EvalResult.from_scorer(scorer, skipped=skipped, seconds=time.perf_counter() - began, flip_tta=flip_tta, names=names)
    if store.sources is not None:
        result.image_paths = {w.id: store.sources[store.ids.index(w.id)] for w in result.worst}
    return result


def score_image(scorer: Scorer, image_id: str, pred: np.ndarray, mask_path: Path, target: np.ndarray, save: Path | None) -> None:
    """Count one (H, W) uint8 prediction against its ground truth; optionally save it as a palette PNG."""
    k = scorer.cm.num_classes
    bad = np.unique(target[(target >= k) & (target != 255)])
    if bad.size:
        raise LabelError(
            f"{mask_path} holds classes {bad[:5].tolist()} but the head predicts {k} classes; "
            "evaluate it against ground truth of the dataset it was trained for"
        )
    scorer.update(image_id, pred, target)
    if save is not None:
        save_palette_png(pred, save / f"{image_id}.png")


def save_palette_png(pred: np.ndarray, path: Path) -> None:
    """(H, W) uint8 class ids -> a palette PNG (the VOC devkit colours; the VOC test-server format)."""
    img = Image.fromarray(pred, mode="P")
    img.putpalette(palette().flatten().tolist())
    img.save(path)


def evaluate(
    run_dir: StrPath,
    gt: LabelSource,
    *,
    store_path: StorePath | None = None,
    val_split: str = "val",
    flip_tta: bool = False,
    save_predictions: Path | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Evaluate a run folder's head on ``store_path`` (default: split ``val_split`` beside the store it
    was trained on) and write metrics.json, confusion.npy/.png and worst.png into the run folder."""
    files = RunFiles(run_dir)
    if not files.is_run():
        raise ConfigError(f"{files.dir} is not a train-head run folder (no {files.config.name})")
    if files.backbone.is_file():  # a finetune run: the cached tokens are the frozen backbone's, so run its own online
        from pipeline.training.finetune import evaluate_finetuned

        return evaluate_finetuned(run_dir, gt, store_path=store_path, val_split=val_split, flip_tta=flip_tta,
                                  save_predictions=save_predictions, device=device, progress=progress)  # fmt: skip
    head, config = load_run(files.dir)
    if store_path is None:
        store_path = sibling_store(config["store"]["path"], val_split)
    store = FeatureStore.open(store_path)
    check_compatible(config, store)
    result = score_head(
        head,
        store,
        gt,
        flip_tta=flip_tta,
        save_predictions=save_predictions,
        device=device,
        progress=progress,
        names=config.get("classes"),
    )
    write_metrics(files, result, config, val_store=str(store.path))
    return result


def write_metrics(files: RunFiles, result: EvalResult, config: dict[str, Any], **extra: Any) -> None:
    """metrics[.<protocol>].json, confusion[.<protocol>].npy/.png and worst[.<protocol>].png of a run."""
    from pipeline.figures.plots import confusion_figure

    protocol = result.protocol
    names = list(result.per_class_iou)  # the names the result was made with
    np.save(files.confusion_for(protocol), result.confusion)
    confusion_figure(result.confusion, names, files.confusion_figure_for(protocol))
    trained = config.get("result", {})
    metrics = {
        "protocol": protocol, "miou": result.miou, "per_class_iou": result.per_class_iou,
        "pixel_accuracy": result.pixel_accuracy, "epochs": trained.get("epochs"), "steps": trained.get("steps"),
        "train_seconds": trained.get("seconds"),
        "eval_seconds": round(result.seconds, 3), "wall_time": round((trained.get("seconds") or 0) + result.seconds, 3),
        "images": result.images, "skipped_images": len(result.skipped), "flip_tta": result.flip_tta,
        "labels": config["labels"]["name"], "head": config["train"]["head"], **extra, "per_image_iou": result.per_image_iou,
    }  # fmt: skip
    files.metrics_for(protocol).write_text(json.dumps(metrics, indent=2))
    _worst_figure(files, result, names)


def _worst_figure(files: RunFiles, result: EvalResult, names: list[str]) -> None:
    """worst.png from the kept lowest-mIoU images whose files can still be read."""
    from pipeline.features.data import load_rgb
    from pipeline.figures.predictions import WorstRow, worst_figure

    rows = []
    for entry in result.worst:
        path = result.image_paths.get(entry.id)
        try:
            image = np.asarray(load_rgb(Path(path))) if path else None
        except DataError:
            image = None
        if image is None or image.shape[:2] != entry.gt.shape:
            log.warning("worst.png: the image file of %s is missing or changed; left out", entry.id)
            continue
        rows.append(WorstRow(entry.id, image, entry.gt, entry.pred, entry.iou))
    if rows:
        title = f"lowest per-image mIoU ({result.protocol})"
        worst_figure(rows, files.worst_for(result.protocol), class_names=names, title=title)
