"""``ssvt finetune``: train-head's head with the backbone unfrozen, online from the images (the paper's
"fine-tuned" column); :mod:`pipeline.training.finetune` does the work.

Usage: ``ssvt finetune --labels seam --backbone-lr 1e-5 --layer-decay 0.9``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.cache.label_kinds import LABEL_KINDS
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
    errors_as_one_line,
    kv_table,
    one_process,
    progress_bar,
    run_folder,
    stage_bars,
)
from pipeline.cli.stage_two import Schedule, _print_eval
from pipeline.heads import DEFAULT_HEAD, HEADS
from pipeline.workspace import Workspace


@app.command("finetune")
@errors_as_one_line
@one_process("finetune")
def finetune_cmd(
    labels: Annotated[str, typer.Option(help="Label source, as for train-head: a name from ssvt.toml, a path or a label set.")],
    head: Annotated[str, typer.Option(help=f"Head, one of {', '.join(HEADS)}.")] = DEFAULT_HEAD,
    label_kind: Annotated[
        str | None, typer.Option(help=f"Kind of a label source given as a path: {', '.join(LABEL_KINDS)}.")
    ] = None,
    store_path: Annotated[
        str | None,
        typer.Option(
            "--store", help="Training store: its canvas, blocks, backbone and label sets are used. Default: the workspace's."
        ),
    ] = None,
    val_store_path: Annotated[
        str | None,
        typer.Option("--val-store", help="Validation store (its images run online). Default: the val split beside --store."),
    ] = None,
    gt: GtOpt = "gt",
    features: FeaturesOpt = None,
    out: Annotated[str | None, typer.Option(help="Run folder (local). Default: <runs>/<labels>-<head>-finetune[-n].")] = None,
    epochs: EpochsOpt = None,
    iterations: Annotated[int | None, typer.Option(help="Optimiser steps. Default: 40,000, unless --epochs is given.")] = None,
    min_steps: MinStepsOpt = 300,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the head.")] = 1e-3,
    backbone_lr: Annotated[float, typer.Option(help="AdamW learning rate of the backbone (its own parameter group).")] = 1e-5,
    layer_decay: Annotated[
        float,
        typer.Option(help="Layer-wise decay: block i gets backbone-lr x decay^(depth-1-i), embeddings the lowest; 1 = off."),
    ] = 1.0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (head and backbone).")] = 1e-4,
    warmup: Annotated[float, typer.Option(help="Fraction of the steps spent warming the learning rates up.")] = 0.0375,
    warmup_iters: WarmupItersOpt = None,
    schedule: Annotated[Schedule, typer.Option(help="Learning-rate decay over all steps.")] = Schedule.poly,
    poly_power: PolyPowerOpt = 1.0,
    pixels_per_image: PixelsOpt = None,
    flip: Annotated[bool, typer.Option(help="Mirror each image and its mask with p = 0.5.")] = True,
    grad_checkpointing: Annotated[
        bool | None, typer.Option(help="Recompute each block in the backward pass (less memory). Default: on with CUDA.")
    ] = None,
    amp: Annotated[bool, typer.Option(help="CUDA: run the backbone under bf16 (else fp16 + gradient scaling) autocast.")] = True,
    workers: Annotated[int, typer.Option(help="DataLoader workers decoding images.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = "auto",
    strict: StrictOpt = False,
    tensorboard: Annotated[bool, typer.Option(help="Also write TensorBoard event files to <run>/tb.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Fine-tune the backbone with the head: train-head's settings, images run online on the cached canvas.

    The baseline of the paper's "frozen vs fine-tuned" table. The run folder is train-head's plus
    backbone.safetensors; `ssvt evaluate RUN` scores it with the tuned backbone online."""
    from pipeline.config import FinetuneConfig, TrainConfig
    from pipeline.training.finetune import finetune_and_evaluate
    from pipeline.training.runs import resolve_labels
    from pipeline.workspace import optional_label_source

    cfg = TrainConfig(
        labels=labels, head=head, epochs=epochs, iterations=iterations, min_steps=min_steps, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup=warmup, warmup_iters=warmup_iters, schedule=schedule.value, poly_power=poly_power,
        pixels_per_image=pixels_per_image, flip=flip, seed=seed, device=device, tensorboard=tensorboard,
    )  # fmt: skip
    ft = FinetuneConfig(backbone_lr=backbone_lr, layer_decay=layer_decay, grad_checkpointing=grad_checkpointing, amp=amp,
                        workers=workers)  # fmt: skip
    ws = Workspace.find(config)
    source = resolve_labels(labels, ws, kind=label_kind, store_path=store_path, features=features)
    gt_source = optional_label_source(gt, ws)
    run_dir = run_folder(out)
    with progress_bar("step/s") as bar:
        outcome = finetune_and_evaluate(cfg, ft, source, ws, store_path=store_path, val_store_path=val_store_path,
                                        gt=gt_source, features=features, out=run_dir, strict=strict,
                                        progress=stage_bars(bar, "loss "))  # fmt: skip
    console.print(kv_table("finetune", [
        ("run", outcome.run_dir), ("labels", outcome.labels), ("images", outcome.train.images),
        ("steps / epochs", f"{outcome.train.steps:,} / {outcome.train.epochs}"),
        ("train time", f"{outcome.train.seconds:.1f} s"),
    ]))  # fmt: skip
    if outcome.evaluation is not None:
        _print_eval(outcome.evaluation)
    else:
        console.print("no validation store or ground truth: not evaluated (see `ssvt evaluate RUN`)")
