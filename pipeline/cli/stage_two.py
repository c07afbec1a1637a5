"""``ssvt train-head`` and ``ssvt pseudo-masks`` (``ssvt evaluate`` and ``ssvt predict``: :mod:`pipeline.cli.evaluation`)."""

from __future__ import annotations

import functools
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from pipeline.cache.label_kinds import LABEL_KINDS, kinds_help
from pipeline.cli._common import (
    ConfigOpt,
    DeviceOpt,
    EpochsOpt,
    FeaturesOpt,
    GtOpt,
    MinStepsOpt,
    PixelsOpt,
    PolyPowerOpt,
    StrictOpt,
    WarmupItersOpt,
    app,
    console,
    err_console,
    errors_as_one_line,
    kv_table,
    one_process,
    progress_bar,
    run_folder,
    stage_bars,
)  # fmt: skip
from pipeline.heads import DEFAULT_HEAD, HEADS, heads_help
from pipeline.workspace import Workspace


class Schedule(StrEnum):
    poly = "poly"
    cosine = "cosine"


@app.command("train-head")
@errors_as_one_line
def train_head_cmd(
    labels: Annotated[
        str,
        typer.Option(
            help="Label source: a name from ssvt.toml \\[labels.*] (gt, scribble, point, seam, eps, vl), a path, "
            "or a label set made by `ssvt pseudo-masks` (e.g. cam)."
        ),
    ],
    head: Annotated[str, typer.Option(help=f"Head, one of {', '.join(HEADS)}. {heads_help()}.")] = DEFAULT_HEAD,
    label_kind: Annotated[
        str | None,
        typer.Option(help=f"Kind of a label source given as a path, one of {', '.join(LABEL_KINDS)}. {kinds_help()}."),
    ] = None,
    store_path: Annotated[
        str | None, typer.Option("--store", help="Training feature store. Default: the workspace's train split in the cache.")
    ] = None,
    val_store_path: Annotated[
        str | None,
        typer.Option("--val-store", help="Validation store, evaluated at the end. Default: the val split beside --store."),
    ] = None,
    gt: GtOpt = "gt",
    features: FeaturesOpt = None,
    out: Annotated[str | None, typer.Option(help="Run folder (local). Default: <runs>/<labels>-<head>[-n].")] = None,
    epochs: EpochsOpt = None,
    iterations: Annotated[
        int | None, typer.Option(help="Optimiser steps. Default: 40,000 as the official config, unless --epochs is given.")
    ] = None,
    min_steps: MinStepsOpt = 300,
    batch_size: Annotated[int, typer.Option(help="Images per step (official: 16).")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (official: 1e-3).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (official: 1e-4).")] = 1e-4,
    warmup: Annotated[
        float,
        typer.Option(help="Fraction of the steps spent warming the learning rate up (official: 1,500 of 40,000 = 0.0375)."),
    ] = 0.0375,
    warmup_iters: WarmupItersOpt = None,
    schedule: Annotated[Schedule, typer.Option(help="Learning-rate decay over all steps (official: poly).")] = Schedule.poly,
    poly_power: PolyPowerOpt = 1.0,
    pixels_per_image: PixelsOpt = None,
    flip: Annotated[bool, typer.Option(help="Use the cached flipped view as augmentation when there is one.")] = True,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same head.")] = 0,
    device: DeviceOpt = "auto",
    strict: StrictOpt = False,
    tensorboard: Annotated[
        bool, typer.Option(help="Also write TensorBoard event files to <run>/tb (needs `pip install tensorboard`).")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Train a light head on cached features with (imperfect) labels, then evaluate it.

    The validation split is evaluated when it is cached. Writes a run folder (weights, config,
    metrics.csv per step, metrics, curve, confusion matrix, log). Under torchrun the head trains
    data-parallel, each process reading its own shards; the global batch (--batch-size) is split
    evenly over the processes and rank 0 writes the run folder."""
    from pipeline.config import TrainConfig
    from pipeline.distributed import Ranks
    from pipeline.training.runs import resolve_labels, train_and_evaluate
    from pipeline.workspace import optional_label_source

    cfg = TrainConfig(
        labels=labels, head=head, epochs=epochs, iterations=iterations, min_steps=min_steps, batch_size=batch_size,
        lr=lr, weight_decay=weight_decay, warmup=warmup, warmup_iters=warmup_iters,
        schedule=schedule.value, poly_power=poly_power, pixels_per_image=pixels_per_image, flip=flip, seed=seed, device=device,
        tensorboard=tensorboard,
    )  # fmt: skip
    ws = Workspace.find(config)
    source = resolve_labels(labels, ws, kind=label_kind, store_path=store_path, features=features)
    gt_source = optional_label_source(gt, ws)
    ranks = Ranks.from_environment()
    train = functools.partial(train_and_evaluate, cfg, source, ws, store_path=store_path, val_store_path=val_store_path,
                              gt=gt_source, features=features, out=run_folder(out), strict=strict, ranks=ranks)  # fmt: skip
    try:
        if not ranks.is_main:  # the other ranks train quietly
            train()
            return
        with progress_bar("step/s") as bar:
            outcome = train(progress=stage_bars(bar, "loss "))
    finally:
        ranks.close()
    _print_run(outcome)
    if tensorboard:
        from pipeline.cache.names import RunFiles

        console.print(f"TensorBoard: tensorboard --logdir {RunFiles(outcome.run_dir).tensorboard}")


def _print_run(outcome: Any) -> None:
    console.print(kv_table("train-head", [
        ("run", outcome.run_dir), ("labels", outcome.labels), ("images", outcome.train.images),
        ("steps / epochs", f"{outcome.train.steps:,} / {outcome.train.epochs}"),
        ("features", "in memory" if outcome.train.in_memory else "streamed from the store"),
        ("train time", f"{outcome.train.seconds:.1f} s"),
    ]))  # fmt: skip
    if outcome.evaluation is not None:
        _print_eval(outcome.evaluation)
    else:
        console.print("no validation store or ground truth: not evaluated (see `ssvt evaluate RUN`)")


def _print_eval(result: Any) -> None:
    table = Table("class", "IoU %", title="per-class IoU", title_justify="left")
    for name, value in result.per_class_iou.items():
        table.add_row(Text(name), "-" if value is None else f"{100 * value:.1f}")
    console.print(table)
    tta = ", flip TTA" if result.flip_tta else ""
    console.print(
        f"[bold]mIoU {100 * result.miou:.1f}[/]  pixel accuracy {100 * result.pixel_accuracy:.1f}  ({result.images} images{tta})"
    )
    if result.skipped:
        err_console.print(Text(f"{len(result.skipped)} images without ground truth or features were skipped", style="yellow"))


@app.command("pseudo-masks")
@errors_as_one_line
@one_process("pseudo-masks")
def pseudo_masks_cmd(
    labels: Annotated[str, typer.Option(help="Image-level label source (kind cls-labels, e.g. cls_labels.npy).")] = "cls",
    out_labels: Annotated[
        str, typer.Option(help="Name of the label set to write; then `ssvt train-head --labels NAME`.")
    ] = "cam",
    store_path: Annotated[
        str | None, typer.Option("--store", help="Training feature store. Default: the workspace's train split in the cache.")
    ] = None,
    features: FeaturesOpt = None,
    gt: Annotated[
        str | None,
        typer.Option(help="Ground truth of these images: chooses the threshold and measures the masks (none: skip)."),
    ] = "gt",
    threshold: Annotated[
        float | None, typer.Option(help="Background threshold on max-normalised class maps. Default: chosen on --gt, else 0.3.")
    ] = None,
    band: Annotated[float, typer.Option(help="Pixels within this of the threshold are left unlabelled (255).")] = 0.05,
    kmeans: Annotated[int, typer.Option(help="Refine with K-means clusters of each image's tokens (K; 0 = off).")] = 0,
    epochs: Annotated[int, typer.Option(help="Passes of the classifier over the labelled images.")] = 30,
    min_steps: Annotated[int, typer.Option(help="Train the classifier at least this many steps.")] = 300,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the classifier.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    figure: Annotated[int, typer.Option(help="Draw cam.png with this many images (0 = none).")] = 6,
    out: Annotated[Path, typer.Option(help="Folder for cam.png.")] = Path("pseudo-masks"),
    device: DeviceOpt = "auto",
    config: ConfigOpt = None,
) -> None:
    """Dense pseudo-masks from image-level labels, made from the cached features.

    Trains a multi-label classifier on the patch tokens, turns its class activation maps into masks
    (background threshold, unconfident pixels 255, only each image's labelled classes) and writes
    them as a label set beside the store."""
    from pipeline.cache.store import FeatureStore
    from pipeline.config import PseudoMaskConfig
    from pipeline.errors import ConfigError
    from pipeline.training.pseudo_masks import draw_cam_figure, make_pseudo_masks
    from pipeline.training.runs import training_store_path
    from pipeline.workspace import label_source, optional_label_source

    if figure < 0:
        raise ConfigError(f"--figure is the number of images in cam.png (0 = none), got {figure}")
    cfg = PseudoMaskConfig(labels=labels, out_labels=out_labels, threshold=threshold, band=band, kmeans=kmeans,
                           epochs=epochs, min_steps=min_steps, lr=lr, seed=seed, device=device)  # fmt: skip
    ws = Workspace.find(config)
    source = label_source(labels, ws, "cls-labels" if ws is None or labels not in ws.labels else None)
    gt_source = optional_label_source(gt, ws)
    store = FeatureStore.open(training_store_path(ws, store_path, features))
    with progress_bar("it/s") as bar:
        num_classes = ws.num_classes if ws else 21
        result = make_pseudo_masks(store, source, cfg, num_classes=num_classes, gt=gt_source, progress=stage_bars(bar))
    rows = [("label set", result.labels.path), ("images", result.images), ("time", f"{result.seconds:.1f} s"),
            ("threshold", f"{result.threshold:.2f} ({result.threshold_source})")]  # fmt: skip
    if result.quality:
        rows += [("mIoU vs ground truth", f"{100 * result.quality['miou']:.1f} % (labelled pixels)"),
                 ("pixels labelled", f"{100 * result.quality['coverage']:.1f} %")]  # fmt: skip
    if figure:
        png, pdf = draw_cam_figure(store, result, out, gt=gt_source, n=figure, seed=seed, num_classes=num_classes)
        rows.append(("figure", f"{png} (+ {pdf.name})"))
    console.print(kv_table("pseudo-masks", rows))
    console.print(f"next: ssvt train-head --labels {out_labels}", markup=False)
