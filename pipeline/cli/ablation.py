"""``ssvt ablate`` (a grid of train-head runs and its tables) and ``ssvt score-labels``."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer
from rich.text import Text

from pipeline.cli._common import (
    ConfigOpt,
    FeaturesOpt,
    app,
    console,
    err_console,
    errors_as_one_line,
    kv_table,
    one_process,
    progress_bar,
    stage_bars,
)
from pipeline.workspace import Workspace


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def train_overrides(args: list[str]) -> dict[str, Any]:
    """``--lr 0.01 --iterations 200 --no-flip`` -> TrainConfig fields, typed as the config declares them.
    Every ``ssvt train-head`` training option works this way."""
    from pipeline.config import TrainConfig
    from pipeline.errors import ConfigError

    fields = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig) if f.name not in ("labels", "head", "seed")}
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        flag = args[i]
        name = flag.removeprefix("--no-").removeprefix("--").replace("-", "_")
        if not flag.startswith("--") or name not in fields:
            valid = ", ".join("--" + f.replace("_", "-") for f in fields)
            raise ConfigError(f"unknown option {flag!r}; ablate takes its own options and these train-head ones: {valid}")
        kind = fields[name]
        if kind == "bool":
            out[name] = not flag.startswith("--no-")
            i += 1
            continue
        if i + 1 >= len(args):
            raise ConfigError(f"{flag} needs a value")
        value = args[i + 1]
        try:
            out[name] = None if value.lower() == "none" and "None" in kind else float(value) if "float" in kind else (
                int(value) if "int" in kind else value)  # fmt: skip
        except ValueError:
            raise ConfigError(f"{flag} takes a {kind.split(' |')[0]}, got {value!r}") from None
        i += 2
    return out


@app.command("ablate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@errors_as_one_line
def ablate_cmd(
    ctx: typer.Context,
    labels: Annotated[str, typer.Option(help="Label sets, comma-separated (e.g. gt,seam,eps,scribble,point).")] = "gt",
    heads: Annotated[str, typer.Option(help="Heads, comma-separated (e.g. linear,bn-linear).")] = "bn-linear",
    features: Annotated[
        str | None,
        typer.Option(help="Cache folders to compare, comma-separated (backbones, layers, sizes). Default: the only one."),
    ] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per cell (0, 1, ...); tables show mean ± std.")] = 1,
    name: Annotated[str, typer.Option(help="Grid folder: ablations/NAME. A rerun trains only the missing cells.")] = "grid",
    rows: Annotated[str, typer.Option(help="Table rows: labels, heads, features or seeds.")] = "labels",
    cols: Annotated[str, typer.Option(help="Table columns: labels, heads, features or seeds.")] = "heads",
    protocol: Annotated[str, typer.Option(help="Evaluation: cache (the proxy), or lin / ms for all cells together.")] = "cache",
    gt: Annotated[str, typer.Option(help="Ground truth: a label source name or a mask folder.")] = "gt",
    config: ConfigOpt = None,
) -> None:
    """Train and evaluate a grid of heads (label sets x heads x features x seeds) and table it.

    Any train-head training option (--iterations, --epochs, --lr, --batch-size, --no-flip, ...) applies
    to every cell. Writes ablations/NAME/: a run folder per cell, results.csv/json, table.md, table.png.
    Under torchrun the cells are shared out over the processes (each cell trains on one) and rank 0
    writes the tables."""
    from pipeline.config import AblateConfig, TrainConfig
    from pipeline.distributed import Ranks
    from pipeline.errors import ConfigError
    from pipeline.training.ablate import run_ablation
    from pipeline.workspace import label_source

    ws = Workspace.find(config)
    if ws is None:
        raise ConfigError("ssvt ablate runs in a workspace: create ssvt.toml with `ssvt init`")
    train = TrainConfig(**train_overrides(list(ctx.args)))
    cfg = AblateConfig(name=name, labels=_names(labels), heads=_names(heads), features=_names(features or ""), seeds=seeds,
                       rows=rows, cols=cols, protocol=protocol, train=train)  # fmt: skip
    gt_source = label_source(gt, ws)
    ranks = Ranks.from_environment()
    try:
        if not ranks.is_main:  # the other ranks train their cells quietly
            run_ablation(cfg, ws, gt=gt_source, ranks=ranks)
            return
        with progress_bar("it/s") as bar:
            grid = run_ablation(cfg, ws, gt=gt_source, progress=stage_bars(bar), ranks=ranks)
    finally:
        ranks.close()
    console.print(grid.table, markup=False)
    for failure in grid.failed:
        err_console.print(Text(f"cell {failure['cell']} failed: {failure['error']}", style="yellow"))
    done = f"{len(grid.trained)} trained now, {len(grid.rows) - len(grid.trained)} done before"
    files = grid.files
    wrote = f"wrote {files.table_md}, {files.results_csv}, {files.table_png}"
    console.print(f"{len(grid.rows)} cells ({done}); {wrote}", markup=False)


@app.command("score-labels")
@errors_as_one_line
@one_process("score-labels")
def score_labels_cmd(
    name: Annotated[str, typer.Argument(help="Label source or label set name (e.g. eps, scribble, cam).")],
    gt: Annotated[str, typer.Option(help="Ground truth: a label source name or a mask folder.")] = "gt",
    store_path: Annotated[
        str | None, typer.Option("--store", help="Feature store the set belongs to. Default: the workspace's train split.")
    ] = None,
    features: FeaturesOpt = None,
    config: ConfigOpt = None,
) -> None:
    """How good a label set is against ground truth on the same images (the paper's "pseudo-label
    itself"): mIoU and pixel accuracy of dense sets, label precision of sparse ones, coverage.

    The scores are stored in the label set, so `ssvt info` shows them."""
    from pipeline.cache.label_kinds import LabelSource
    from pipeline.cache.labels import LabelSet, ensure_labels
    from pipeline.cache.names import label_set_path
    from pipeline.cache.store import FeatureStore
    from pipeline.training.label_quality import score_labels
    from pipeline.training.runs import resolve_labels, training_store_path
    from pipeline.workspace import label_source

    ws = Workspace.find(config)
    store = FeatureStore.open(training_store_path(ws, store_path, features))
    num_classes = ws.num_classes if ws else 21
    source = resolve_labels(name, ws, store_path=store.path)
    with progress_bar() as bar:
        report = stage_bars(bar)
        if isinstance(source, LabelSource):
            labels = ensure_labels(source, store, num_classes=num_classes, progress=lambda d, t: report("import", d, t))
        else:
            labels = LabelSet.open(label_set_path(store.path, source))
        quality = score_labels(labels, store, label_source(gt, ws), source=source if isinstance(source, LabelSource) else None,
                               num_classes=num_classes, names=ws.classes if ws else None,
                               progress=lambda d, t: report("score", d, t))  # fmt: skip
    rows: list[tuple[str, Any]] = [("label set", labels.path), ("images", quality.images), ("compared at", quality.resolution)]
    if quality.miou is not None:
        rows.append(("mIoU (labelled pixels)", f"{100 * quality.miou:.1f} %"))
    if quality.pixel_accuracy is not None:
        rows.append(("precision" if quality.sparse else "pixel accuracy", f"{100 * quality.pixel_accuracy:.1f} %"))
    rows.append(("coverage", f"{100 * quality.coverage:.2f} % of image pixels"))
    if quality.sparse:
        best = {k: v for k, v in quality.precision.items() if v is not None}
        rows.append(("precision per class", ", ".join(f"{k} {100 * v:.0f}" for k, v in best.items())))
    console.print(kv_table("score-labels", rows))
