"""``ssvt evaluate`` (the cached proxy or the official protocols, many runs at once) and ``ssvt predict``."""

from __future__ import annotations

import functools
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from pipeline.cache.names import RunFiles
from pipeline.cli._common import (
    ConfigOpt,
    DeviceOpt,
    _update_task,
    app,
    console,
    err_console,
    errors_as_one_line,
    kv_table,
    one_process,
    progress_bar,
    stage_bars,
)  # fmt: skip
from pipeline.cli.stage_two import _print_eval
from pipeline.workspace import Workspace


class ProtocolName(StrEnum):
    cache = "cache"
    lin = "lin"
    ms = "ms"


ProtocolOpt = Annotated[
    ProtocolName,
    typer.Option(
        help="cache: the fast proxy on the cached canvas (metrics.json). lin: the official DINOv2 linear test "
        "pipeline (short side 512, 512-px sliding windows, stride 341). ms: the official multi-scale + flip one "
        "(short side 640 x 1.0-3.0, 640-px windows, stride 320). lin and ms run the backbone online."
    ),
]
BatchOpt = Annotated[int, typer.Option(help="lin/ms: backbone windows per batch (halved automatically on CUDA out-of-memory).")]
WorkersOpt = Annotated[int, typer.Option(help="lin/ms: DataLoader workers decoding and resizing images.")]
WeightsOpt = Annotated[
    str | None, typer.Option(help="lin/ms: backbone weights file, when they are not where the training store found them.")
]
DataOpt = Annotated[Path | None, typer.Option(help="lin/ms: image dataset (VOC root or folder) instead of the run's val split.")]


@app.command("evaluate")
@errors_as_one_line
@one_process("evaluate")
def evaluate_cmd(
    runs: Annotated[list[Path], typer.Argument(help="One or more train-head run folders.")],
    protocol: ProtocolOpt = ProtocolName.cache,
    store_path: Annotated[
        str | None,
        typer.Option("--store", help="cache: validation feature store. Default: the split next to the run's training store."),
    ] = None,
    gt: Annotated[str, typer.Option(help="Ground truth: a label source name from ssvt.toml or a mask folder.")] = "gt",
    split: Annotated[str | None, typer.Option(help="Split to score. Default: the workspace's val split, else val.")] = None,
    data: DataOpt = None,
    flip_tta: Annotated[bool, typer.Option(help="cache: average with the cached flipped view (needs extract --flip).")] = False,
    save_predictions: Annotated[
        Path | None, typer.Option(help="Write palette PNGs <id>.png at original resolution here (a subfolder per run).")
    ] = None,
    weights: WeightsOpt = None,
    batch_size: BatchOpt = 8,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    config: ConfigOpt = None,
) -> None:
    """Score trained heads as papers do: one confusion matrix over the split at original resolution.

    Writes metrics.json (cache) or metrics.<protocol>.json, the confusion matrix and worst.png (the
    images with the lowest mIoU) into each run folder. With lin/ms, runs on the same backbone share
    one backbone pass."""
    from pipeline.inference.evaluate import evaluate_runs
    from pipeline.workspace import label_source

    ws = Workspace.find(config)
    gt_source = label_source(gt, ws)
    split = split or (ws.val_split if ws and ws.val_split else "val")
    with progress_bar() as bar:
        results = evaluate_runs(runs, gt_source, protocol=protocol.value, workspace=ws, store_path=store_path, data=data,
                                split=split, weights=weights, flip_tta=flip_tta, save_predictions=save_predictions,
                                device=device, batch_size=batch_size, workers=workers, progress=stage_bars(bar))  # fmt: skip
    if len(results) == 1:
        _print_eval(results[0].result)
    else:
        table = Table("run", "mIoU %", "pixel acc. %", "images", title=f"protocol {protocol.value}", title_justify="left")
        for r in results:
            table.add_row(
                Text(str(r.run_dir)), f"{100 * r.result.miou:.1f}", f"{100 * r.result.pixel_accuracy:.1f}", str(r.result.images)
            )
        console.print(table)
    written = ", ".join(str(RunFiles(r.run_dir).metrics_for(protocol.value)) for r in results[:3])
    console.print(f"protocol {protocol.value}: wrote {written}" + (" ..." if len(results) > 3 else ""), markup=False)


@app.command("predict")
@errors_as_one_line
@one_process("predict")
def predict_cmd(
    run: Annotated[Path, typer.Argument(help="A train-head run folder.")],
    out: Annotated[Path, typer.Option(help="Folder for <id>.png (palette PNGs at the original size).")],
    data: Annotated[
        Path | None, typer.Option(help="Images to predict: a folder, a list file or a VOC root (with --split).")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="A split of the workspace dataset (or of the VOC root given as --data).")
    ] = None,
    protocol: ProtocolOpt = ProtocolName.lin,
    store_path: Annotated[str | None, typer.Option("--store", help="cache: the feature store to predict from.")] = None,
    overlay: Annotated[bool, typer.Option(help="Also write overlay/<id>.png: the image in class colours with a legend.")] = False,
    probs: Annotated[
        bool, typer.Option(help="Also write probs/<id>.npz: class probabilities at the original size as uint8 (p = v/255).")
    ] = False,
    weights: WeightsOpt = None,
    batch_size: BatchOpt = 8,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    config: ConfigOpt = None,
) -> None:
    """Predict images without ground truth: palette PNGs in the VOC test-server format.

    Optionally overlays and probabilities. lin (default) and ms run the backbone online on --data or
    --split; cache reads a feature store."""
    from pipeline.cache.names import sibling_store
    from pipeline.errors import ConfigError
    from pipeline.features.data import find_images
    from pipeline.inference.evaluate import load_for_protocol, protocol_items
    from pipeline.inference.predict import predict
    from pipeline.training.evaluate import load_run

    ws = Workspace.find(config)
    items = None
    if protocol is ProtocolName.cache:
        if store_path is None and split is not None:
            store_path = str(sibling_store(load_run(run)[1]["store"]["path"], split))
    elif data is not None:
        items = find_images(data, split)
    elif split is not None:
        items = protocol_items(load_for_protocol(run, weights), data=None, split=split, workspace=ws)
    else:
        raise ConfigError("name the images: --data PATH (a folder, list or VOC root) or --split NAME")
    with progress_bar() as bar:
        task = bar.add_task("predict", total=None)
        summary = predict(run, out, items=items, store_path=store_path, protocol=protocol.value, overlay=overlay, probs=probs,
                          weights=weights, device=device, batch_size=batch_size, workers=workers,
                          progress=functools.partial(_update_task, bar, task))  # fmt: skip
    rows = [
        ("predictions", out),
        ("images", summary.images),
        ("protocol", summary.protocol),
        ("time", f"{summary.seconds:.1f} s"),
    ]
    console.print(kv_table("predict", rows))
    for image_id, error in summary.failed[:5]:
        err_console.print(Text(f"skipped {image_id}: {error}", style="yellow"))
