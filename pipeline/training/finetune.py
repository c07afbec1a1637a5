"""``ssvt finetune``: train-head's head trained with the backbone unfrozen, online from the images.

The baseline of the paper's "frozen vs fine-tuned" table. Each training image is decoded and placed
on the canvas exactly as ``ssvt extract`` placed it (the training store's recorded geometry), so the
label set imported beside that store is used as it is; the backbone gives the store's blocks after
its final norm, and the head, loss, flip (p = 0.5, image and mask mirrored together), schedule and
batch order are train-head's. Usage::

    store = FeatureStore.open("cache/dinov2_vits14-448-last/train.zarr")
    cfg, ft = TrainConfig(labels="seam", iterations=40_000), FinetuneConfig(backbone_lr=1e-5, layer_decay=0.9)
    finetune(store, open_label_set(store, "seam"), cfg, ft, Path("runs/seam-ft"), num_classes=21)
    evaluate_finetuned("runs/seam-ft", ws.labels["gt"]).miou     # the val canvas, tuned backbone online

The run folder is train-head's plus ``backbone.safetensors`` (the tuned weights in the official
layout) and a ``finetune`` entry in config.json (the settings and the tuned weights' SHA-256). The
cached features belong to the frozen backbone, so ``ssvt evaluate`` scores a finetune run online:
``--protocol cache`` runs the tuned backbone on the cached split's canvases (:func:`evaluate_finetuned`),
``lin`` and ``ms`` load the tuned weights (:func:`pipeline.inference.evaluate.load_for_protocol`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.cache.geometry import Geometry
from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.labels import LabelSet, ensure_labels
from pipeline.cache.names import CacheLayout, ImageStatus, RunFiles, StorePath, StrPath, run_stem, sibling_store
from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig, FinetuneConfig, TrainConfig
from pipeline.devices import autocast, autocast_dtype, pick_device, pin_memory
from pipeline.errors import ConfigError, DataError, LabelError, StoreMismatchError
from pipeline.features import checkpoints
from pipeline.features.backbones import Backbone, to_official_state_dict
from pipeline.features.data import load_rgb
from pipeline.features.extract import load_backbone
from pipeline.features.tunable import TunableBackbone, layer_decay_groups
from pipeline.heads import SegHead, build_head
from pipeline.inference.evaluate import _backbone, load_for_protocol
from pipeline.resample import canvas_to_original, image_to_canvas
from pipeline.training.evaluate import WORST_IMAGES, EvalResult, check_compatible, score_image, write_metrics
from pipeline.training.metrics import Scorer
from pipeline.training.runs import RunOutcome, StageProgress, _finish, open_label_set, run_log, training_store_path
from pipeline.training.steplog import StepLog, summary_writer_class
from pipeline.training.train import LOSS_SEED_OFFSET, TrainProgress, TrainResult, _loss, lr_lambda, training_images, write_run
from pipeline.workspace import Workspace

log = logging.getLogger(__name__)


class CanvasImages(torch.utils.data.Dataset):
    """Item ``i`` -> (i, pixels (3, S, S) float32): image ``paths[i]`` decoded and placed on the canvas by
    its recorded geometry ``geometries[i]``, as ``ssvt extract`` placed it (for DataLoader workers)."""

    def __init__(self, paths: Sequence[Path], geometries: Sequence[Geometry], mean: tuple[float, ...], std: tuple[float, ...]):
        self.paths, self.geometries, self.mean, self.std = list(paths), list(geometries), mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        image, geom = load_rgb(self.paths[i]), self.geometries[i]
        if (image.height, image.width) != (geom.height, geom.width):
            raise DataError(
                f"{self.paths[i]} is {image.height}x{image.width} but was {geom.height}x{geom.width} when its features "
                "were extracted; extract the store again"
            )
        return i, image_to_canvas(image, geom, self.mean, self.std)


def canvas_images(store: FeatureStore, indices: np.ndarray, backbone: Backbone) -> CanvasImages:
    """The images of store ``indices`` on the store's canvas, normalised for ``backbone``."""
    if store.sources is None:
        raise ConfigError(f"{store.path} does not record its image files; extract it again to fine-tune or evaluate online")
    geoms = store.geometries()
    paths = [Path(store.sources[int(i)]) for i in indices]
    return CanvasImages(paths, [geoms[int(i)] for i in indices], backbone.mean, backbone.std)


def pretrained_backbone(store: FeatureStore) -> Backbone:
    """The frozen backbone ``store`` was extracted with, rebuilt from its recorded extract settings."""
    settings = store.attrs.get("extract_config")
    if not settings:
        raise ConfigError(f"{store.path} does not record its extract settings (an older ssvt wrote it); extract it again")
    return load_backbone(ExtractConfig.from_dict(dict(settings)))


class Tuner:
    """The head and the trainable backbone: one AdamW (the head's group first, then the backbone's groups),
    train-head's schedule on every group, autocast and a gradient scaler for fp16, and the step log."""

    def __init__(self, backbone: TunableBackbone, store: FeatureStore, labels: LabelSet, masks: torch.Tensor, num_classes: int,
                 cfg: TrainConfig, ft: FinetuneConfig, total: int, run_dir: Path, device: torch.device):  # fmt: skip
        self.backbone, self.labels, self.masks, self.cfg, self.device = backbone, labels, masks, cfg, device
        self.layers = tuple(store.layers)
        torch.manual_seed(cfg.seed)  # the head's initial weights, as train-head draws them
        self.head: SegHead = build_head(cfg.head, store.channels, num_classes, n_layers=len(self.layers))
        self.head.to(device).train()
        groups = [{"name": "head", "params": list(self.head.parameters()), "lr": cfg.lr}]
        self.optim = torch.optim.AdamW(groups + layer_decay_groups(backbone, ft.backbone_lr, ft.layer_decay),
                                       weight_decay=cfg.weight_decay)  # fmt: skip
        factor = lr_lambda(cfg.schedule, total, cfg.warmup_steps(total), cfg.poly_power)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, factor)
        self.dtype = autocast_dtype(device) if ft.amp else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.log = StepLog(run_dir, tensorboard=cfg.tensorboard)
        self.generator = torch.Generator().manual_seed(cfg.seed + LOSS_SEED_OFFSET)  # the loss's random pixels
        self.running = float("nan")

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(b, 3, S, S) -> the store's blocks' tokens (b, h, w, C) float32, the backbone under autocast."""
        with autocast(self.device) if self.dtype is not None else contextlib.nullcontext():
            return self.backbone(pixels, self.layers)[0].float()

    def step(self, pixels: torch.Tensor, pos: torch.Tensor, flipped: torch.Tensor, n_step: int, epoch: int) -> None:
        """One optimiser step on canvases ``pixels`` of training images ``pos``, the ``flipped`` ones mirrored."""
        x = pixels.to(self.device, non_blocking=True)
        x = torch.where(flipped.to(self.device)[:, None, None, None], x.flip(-1), x)
        target = self.masks[pos]
        target = torch.where(flipped[:, None, None], target.flip(-1), target).to(self.device)
        loss = _loss(self.head(self.tokens(x)), target, self.labels.sparse, self.cfg.pixels_per_image, self.generator)
        self.optim.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        lr = float(self.sched.get_last_lr()[0])  # the head's rate this step
        self.scaler.step(self.optim)
        self.scaler.update()
        self.sched.step()
        value = float(loss.detach())
        self.running = value if math.isnan(self.running) else 0.9 * self.running + 0.1 * value
        self.log.append({"step": n_step, "epoch": epoch, "loss": value, "lr": lr})


def finetune(
    store: FeatureStore,
    labels: LabelSet,
    cfg: TrainConfig,
    ft: FinetuneConfig,
    run_dir: Path,
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    backbone: Backbone | None = None,
    progress: TrainProgress | None = None,
) -> TrainResult:
    """Train ``cfg.head`` and a trainable copy of ``store``'s backbone (``backbone``, else rebuilt from the
    store's extract settings; left unchanged) on ``labels``, and write the run folder (module docstring)."""
    if cfg.tensorboard:
        summary_writer_class()  # a missing package fails before the backbone is loaded
    device = pick_device(cfg.device)
    indices = training_images(store, labels)
    total = cfg.total_steps(len(indices))
    frozen = backbone if backbone is not None else pretrained_backbone(store)
    if store.identity.weights_sha256 and frozen.fingerprint != store.identity.weights_sha256:
        raise StoreMismatchError(
            f"the weights of {frozen.weights_source} are not the ones {store.path} was extracted with (SHA-256 differs); "
            "restore the weights the store was extracted with, or extract it again"
        )
    checkpointing = device.type == "cuda" if ft.grad_checkpointing is None else ft.grad_checkpointing
    tuned = TunableBackbone.from_frozen(frozen, grad_checkpointing=checkpointing).to(device)
    masks = torch.from_numpy(labels.masks(indices))  # (n, S, S) uint8 on the host, 255 = ignore
    tuner = Tuner(tuned, store, labels, masks, num_classes, cfg, ft, total, run_dir, device)
    began = time.perf_counter()
    with tuner.log:
        step, epochs = _train(tuner, canvas_images(store, indices, tuned), total, ft.workers, progress)
    result = TrainResult(run_dir, step, epochs, len(indices), time.perf_counter() - began, False, tuner.log.history)
    _write_finetune_run(tuner, ft, frozen, store, result, num_classes, class_names, checkpointing)
    return result


def _train(tuner: Tuner, images: CanvasImages, total: int, workers: int, progress: TrainProgress | None) -> tuple[int, int]:
    """``total`` steps over ``images`` (batch order and flips drawn as train-head draws them); (steps, epochs)."""
    cfg = tuner.cfg
    generator = torch.Generator().manual_seed(cfg.seed)
    step, epochs = 0, 0
    while step < total:
        epochs += 1
        order = torch.randperm(len(images), generator=generator)
        batches = [order[i : i + cfg.batch_size].tolist() for i in range(0, len(order), cfg.batch_size)]
        loader = torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=workers,
                                             pin_memory=pin_memory(tuner.device))  # fmt: skip
        for pos, pixels in loader:
            if step == total:
                break
            n = len(pos)
            view = torch.randint(0, 2, (n,), generator=generator) if cfg.flip else torch.zeros(n, dtype=torch.long)
            step += 1
            tuner.step(pixels, pos, view == 1, step, epochs)
            if progress:
                progress(step, total, tuner.running)
    return step, epochs


def _write_finetune_run(tuner: Tuner, ft: FinetuneConfig, pretrained: Backbone, store: FeatureStore, result: TrainResult,
                        num_classes: int, class_names: Sequence[str] | None, checkpointing: bool) -> None:  # fmt: skip
    """backbone.safetensors (official layout, float32), then train-head's files, then config.json's ``finetune``."""
    files = RunFiles(result.run_dir)
    files.dir.mkdir(parents=True, exist_ok=True)
    tuner.head.eval()
    tuner.backbone.eval()
    state = {k: v.detach().cpu().contiguous().clone() for k, v in to_official_state_dict(tuner.backbone).items()}
    save_file(state, str(files.backbone))
    write_run(result.run_dir, tuner.head, tuner.cfg, store, tuner.labels, num_classes, result, device=str(tuner.device),
              class_names=class_names)  # fmt: skip
    config = json.loads(files.config.read_text())
    config["finetune"] = {
        **ft.to_dict(), "grad_checkpointing": checkpointing, "precision": tuner.precision,
        "backbone_file": files.backbone.name, "backbone_sha256": checkpoints.fingerprint(state),
        "pretrained_sha256": pretrained.fingerprint, "pretrained_weights": pretrained.weights_source,
    }  # fmt: skip
    files.config.write_text(json.dumps(config, indent=2))


def finetune_and_evaluate(
    cfg: TrainConfig,
    ft: FinetuneConfig,
    source: LabelSource | str,
    ws: Workspace | None,
    *,
    store_path: StrPath | None = None,
    val_store_path: StrPath | None = None,
    gt: LabelSource | None = None,
    features: str | None = None,
    out: Path | None = None,
    strict: bool = False,
    progress: StageProgress | None = None,
) -> RunOutcome:
    """:func:`pipeline.training.runs.train_and_evaluate` with :func:`finetune` in place of train_head: the
    label set is imported (or found) beside the training store, the run goes to ``out`` or
    ``<runs>/<labels>-<head>-finetune[-n]``, and the val split is scored online when it is cached."""
    report = progress or (lambda *_: None)
    if isinstance(source, LabelSource) and not source.spec.trainable:
        raise LabelError(
            f"{source.name!r} holds image-level labels (kind {source.kind}); fine-tune on pseudo-masks made from them"
        )
    train_path = training_store_path(ws, store_path, features)
    store = FeatureStore.open(train_path)
    num_classes = ws.num_classes if ws else 21
    if isinstance(source, str):
        labels = open_label_set(store, source)
    else:
        labels = ensure_labels(source, store, num_classes=num_classes, strict=strict,
                               progress=lambda d, t: report(f"import {source.name}", d, t, None))  # fmt: skip
    run_dir = out or (ws.layout if ws else CacheLayout("cache")).new_run_dir(run_stem(labels.name, f"{cfg.head}-finetune"))
    with run_log(run_dir):
        log.info("fine-tuning %s with a %s head on %s, labels %r (backbone lr %g, layer decay %g)", store.backbone, cfg.head,
                 train_path, labels.name, ft.backbone_lr, ft.layer_decay)  # fmt: skip
        result = finetune(store, labels, cfg, ft, run_dir, num_classes=num_classes, class_names=ws.classes if ws else None,
                          progress=lambda s, t, loss: report("train", s, t, loss))  # fmt: skip
        evaluation = _finish(run_dir, cfg, result, train_path, ws, gt, val_store_path, report)
    return RunOutcome(run_dir, labels.name, result, evaluation)


def evaluate_finetuned(
    run_dir: StrPath,
    gt: LabelSource,
    *,
    store_path: StorePath | None = None,
    val_split: str = "val",
    flip_tta: bool = False,
    save_predictions: Path | None = None,
    device: str = "auto",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """The "cache" protocol for a finetune run: each image of ``store_path`` (default: split ``val_split``
    beside the training store) on the store's canvas, one view, through the tuned backbone and the head,
    scored at the original resolution like :func:`pipeline.training.evaluate.evaluate`; writes metrics.json.
    ``workers`` decode images (default: the run's). With ``flip_tta`` the mirrored canvas is averaged in."""
    files = RunFiles(run_dir)
    if not files.backbone.is_file():
        raise ConfigError(f"{files.dir} is not a finetune run (no {files.backbone.name})")
    run = load_for_protocol(run_dir)
    backbone = _backbone(run)  # the tuned weights, checked against the SHA-256 recorded at fine-tuning
    store = FeatureStore.open(store_path or sibling_store(run.config["store"]["path"], val_split))
    check_compatible(run.config, store)
    if workers is None:
        workers = int(run.config["finetune"].get("workers", 2))
    result = score_online(backbone, run.layers, run.head, store, gt, flip_tta=flip_tta, save_predictions=save_predictions,
                          device=device, workers=workers, progress=progress, names=run.config.get("classes"))  # fmt: skip
    write_metrics(files, result, run.config, val_store=str(store.path), features="online (fine-tuned backbone)")
    return result


def score_online(
    backbone: Backbone,
    layers: Sequence[int],
    head: SegHead,
    store: FeatureStore,
    gt: LabelSource,
    *,
    flip_tta: bool = False,
    save_predictions: Path | None = None,
    device: str = "auto",
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    names: Sequence[str] | None = None,
) -> EvalResult:
    """mIoU of ``head`` on ``backbone``'s tokens of ``store``'s canvases, computed online, against ``gt``
    at the original resolution (:func:`pipeline.training.evaluate.score_head` with a backbone in front)."""
    gt.require_dense("evaluation")
    reader, dev = gt.reader(head.num_classes), pick_device(device)
    backbone, head = backbone.to(dev).eval(), head.to(dev).eval()
    scorer = Scorer(head.num_classes, keep_worst=WORST_IMAGES)
    geoms, status, began = store.geometries(), store.status(), time.perf_counter()
    ok = np.flatnonzero(status == ImageStatus.OK)
    skipped = [store.ids[i] for i in np.flatnonzero(status != ImageStatus.OK)]
    if save_predictions is not None:
        save_predictions.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(canvas_images(store, ok, backbone), batch_size=8, num_workers=workers,
                                         pin_memory=pin_memory(dev))  # fmt: skip
    for pos, pixels in loader:
        logits = _canvas_logits(backbone, head, pixels.to(dev), tuple(layers), flip_tta)
        for j, p in enumerate(pos.tolist()):
            index = int(ok[p])
            found = reader.original(store.ids[index], geoms[index])
            if found is None:
                skipped.append(store.ids[index])
                continue
            pred = canvas_to_original(logits[j], geoms[index]).argmax(0).to(torch.uint8).cpu().numpy()
            score_image(scorer, store.ids[index], pred, *found, save_predictions)
        if progress:
            progress(int(pos[-1]) + 1, len(ok))
    if len(skipped) == store.n_images:
        raise LabelError(f"no ground truth in {gt.path} for any image of {store.path}; do the ids match?")
    result = EvalResult.from_scorer(scorer, skipped=skipped, seconds=time.perf_counter() - began, flip_tta=flip_tta, names=names)
    sources = store.sources or []
    result.image_paths = {w.id: sources[store.ids.index(w.id)] for w in result.worst}
    return result


def _canvas_logits(backbone: Backbone, head: SegHead, x: torch.Tensor, layers: tuple[int, ...], flip_tta: bool) -> torch.Tensor:
    """(b, 3, S, S) canvases -> (b, K, h, w) float32 patch logits (averaged with the mirrored canvas's, flipped back)."""
    with torch.inference_mode():
        with autocast(x.device):
            tokens = backbone(x, layers)[0]
        logits = head(tokens.float()).float()
        if flip_tta:
            with autocast(x.device):
                mirrored = backbone(x.flip(-1), layers)[0]
            logits = (logits + head(mirrored.float()).float().flip(-1)) / 2
    return logits
