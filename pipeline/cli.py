"""The ``ssvt`` command line. Each command parses its flags, builds a config and calls one library
function; progress bars and tables are drawn here and nowhere else.

Usage: ``ssvt --help``; ``ssvt demo``; ``ssvt extract --model dinov2_vitl14``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from pipeline.config import INIT_TEMPLATE, WORKSPACE_FILE, ExtractConfig, Workspace
from pipeline.errors import ConfigError, SsvtError

app = typer.Typer(
    name="ssvt",
    help="Semantic segmentation from imperfect labels on cached, frozen DINOv2 features.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
console = Console(soft_wrap=True)  # long paths stay on one line, copyable
err_console = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": False}

ConfigOpt = Annotated[Path | None, typer.Option("--config", help=f"Workspace file (default: ./{WORKSPACE_FILE} when present).")]


class Layers(StrEnum):
    last = "last"
    last4 = "last4"


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log library messages.")] = False,
) -> None:
    _state["debug"] = debug
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO if verbose else logging.WARNING)  # run folders still get INFO in train.log
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def errors_as_one_line(fn: F) -> F:
    """Print an ssvt error as one red line and exit 1 (a traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SsvtError, KeyboardInterrupt) as exc:
            if _state["debug"]:
                raise
            message = "interrupted; rerun the same command to resume" if isinstance(exc, KeyboardInterrupt) else str(exc)
            err_console.print(Text(f"error: {message}", style="bold red"))
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class RateColumn(ProgressColumn):
    """Items per second: rich's recent-speed estimate, else the average since the start."""

    def __init__(self, unit: str = "img/s"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        speed = task.finished_speed or task.speed or (task.completed / elapsed if elapsed > 0 else None)
        return Text(f"{speed:,.1f} {self.unit}" if speed else f"- {self.unit}", style="progress.data.speed")


def progress_bar(unit: str = "img/s") -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
        TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
    )  # fmt: skip


def _update_task(bar: Progress, task: Any, done: int, total: int) -> None:
    bar.update(task, completed=done, total=total)


def kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table


# ---------------------------------------------------------------- workspace and toy data


@app.command()
@errors_as_one_line
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the workspace file.")] = Path(WORKSPACE_FILE),
    force: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Write a commented ssvt.toml workspace file to edit: dataset root, splits, cache and label sources."""
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to replace it")
    path.write_text(INIT_TEMPLATE)
    console.print(f"wrote {path}: set [dataset] root and the label sources, then run `ssvt extract`")


@app.command("make-toy")
@errors_as_one_line
def make_toy_cmd(
    out: Annotated[Path, typer.Argument(help="Folder to write the toy dataset and its ssvt.toml into.")],
    n_train: Annotated[int, typer.Option(help="Training images.")] = 64,
    n_val: Annotated[int, typer.Option(help="Validation images.")] = 24,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Write a small synthetic dataset in the PASCAL VOC layout, with scribble, point, pseudo-mask
    (seam, eps), vision-language and image-level labels in their real formats, and a workspace file."""
    from pipeline.toy import make_toy

    make_toy(out, n_train=n_train, n_val=n_val, seed=seed)
    console.print(f"wrote {n_train} train + {n_val} val images, their label sets and {out / WORKSPACE_FILE}")
    console.print(f"next: cd {out} && ssvt extract --model dinov2_vits14   (add --random-init when no weights are cached)")


# ---------------------------------------------------------------- stage one


@app.command()
@errors_as_one_line
def extract(
    model: Annotated[
        str, typer.Option(help="Backbone: a DINOv2 hub name (dinov2_vits14 ... dinov2_vitg14_reg); `ssvt models` lists them.")
    ] = "dinov2_vitl14",
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset: a VOC root, an images/ (+ masks/) folder, a plain image folder or a text file listing images. "
            "Default: the workspace's [dataset] root."
        ),
    ] = None,
    split: Annotated[
        list[str] | None,
        typer.Option(help="Split(s) to extract (VOC ImageSets/Segmentation/<split>.txt). Default: the workspace's splits."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Store path (one split). Default: <cache>/<model>-<size>-<layers>/<split>.zarr.")
    ] = None,
    size: Annotated[
        int,
        typer.Option(
            help="Canvas side in pixels, a multiple of 14: images are resized so the longer side is this, "
            "then padded to a square."
        ),
    ] = 448,
    layers: Annotated[
        str, typer.Option(help="Blocks to cache: last, last4 (the '+ms' recipe, concatenated) or indices like 8,9,10,11.")
    ] = "last",
    flip: Annotated[
        bool, typer.Option(help="Also cache the horizontally flipped view (training augmentation, flip test-time augmentation).")
    ] = False,
    weights: Annotated[
        Path | None,
        typer.Option(
            help="Weights: an HF model folder or an official dinov2_*_pretrain.pth. Default: the torch hub / HF caches."
        ),
    ] = None,
    random_init: Annotated[
        bool, typer.Option(help="Use a seeded random initialisation instead of pretrained weights (tests and offline demos).")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (halved automatically on CUDA out-of-memory).")] = 8,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes that decode and resize images.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    images_per_shard: Annotated[int | None, typer.Option(help="Images per zarr shard (default: about 128 MB per shard).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store made with other settings.")] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable image instead of reporting it at the end.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Run a frozen DINOv2 once over a dataset and cache its patch tokens in a sharded zarr store.

    Rerunning the same command after a crash finishes the missing shards only."""
    from pipeline.extract import extract as run_extract

    cfg = ExtractConfig(
        model=model, size=size, layers=layers, flip=flip, weights=str(weights) if weights else None,
        random_init=random_init, batch_size=batch_size, workers=workers, device=device,
        images_per_shard=images_per_shard, strict=strict,
    )  # fmt: skip
    for split_name, items, store_path in _extract_targets(cfg, data, split, out, config):
        with progress_bar() as bar:
            task = bar.add_task(f"extract {split_name}", total=None)
            summary = run_extract(
                items, store_path, cfg, overwrite=overwrite,
                progress=functools.partial(_update_task, bar, task),
            )  # fmt: skip
        _print_extract_summary(split_name, summary)


def _extract_targets(
    cfg: ExtractConfig, data: Path | None, splits: list[str] | None, out: Path | None, config: Path | None
) -> list[tuple[str, Any, Path]]:
    from pipeline.data import find_images

    ws = Workspace.find(config)
    if data is None and ws is None:
        raise ConfigError(f"no dataset: pass --data PATH or run where a {WORKSPACE_FILE} is (see `ssvt init`)")
    root = data if data is not None else ws.data_root  # type: ignore[union-attr]
    fmt = None if data is not None else ws.data_format  # type: ignore[union-attr]
    names: list[str | None] = list(splits) if splits else (list(ws.splits) if ws and data is None else [None])
    if out is not None and len(names) > 1:
        raise ConfigError(f"--out names one store but {len(names)} splits are selected; add --split")
    targets = []
    for name in names:
        items = find_images(root, name, fmt)
        label = name or Path(root).stem
        if out is not None:
            path = out
        elif ws is not None:
            path = ws.cache_dir / cfg.cache_name / f"{label}.zarr"
        else:
            raise ConfigError("no workspace to name the store after: pass --out STORE.zarr")
        targets.append((label, items, path))
    return targets


def _print_extract_summary(split: str, s: Any) -> None:
    rows = [
        ("store", s.store), ("images", s.n_images), ("extracted now", s.images_done),
        ("shards written / already done", f"{s.shards_written} / {s.shards_skipped}"),
        ("unreadable images", len(s.failed)), ("device", s.device), ("weights", s.weights_source),
        ("time", f"{s.seconds:.1f} s"), ("throughput", f"{s.images_per_s:.1f} img/s"),
    ]  # fmt: skip
    console.print(kv_table(f"extract {split}", rows))
    for path, error in s.failed:
        err_console.print(Text(f"unreadable: {path}: {error}", style="yellow"))


@app.command()
@errors_as_one_line
def info(store: Annotated[Path, typer.Argument(help="A feature store (.zarr folder).")]) -> None:
    """Describe a feature store: model, grid, views, images, completeness, size on disk, label sets."""
    from pipeline.store import FeatureStore

    fs = FeatureStore.open(store)
    i = fs.info()
    gib = 2**30
    rows = [
        ("backbone", i["backbone"]),
        ("weights", f"{str(fs.attrs.get('weights_sha256', ''))[:12]}… ({fs.attrs.get('weights_source', '?')})"),
        ("layers", ", ".join(map(str, i["layers"]))),
        ("canvas / grid", f"{i['size']} px / {i['grid'][0]} x {i['grid'][1]} tokens"),
        ("channels", i["channels"]), ("views", ", ".join(i["views"])),
        ("images", f"{i['n_images']} ({i['ok']} ok, {i['failed']} unreadable, {i['not_written']} not written yet)"),
        ("complete", f"{'yes' if i['complete'] else 'NO'}: {i['done_shards']} of {i['n_shards']} shards"
                     f" ({i['images_per_shard']} images per shard)"),
        ("bytes on disk", f"{i['bytes_on_disk'] / gib:.3f} GiB (raw tokens {i['raw_token_bytes'] / gib:.3f} GiB)"),
        ("label sets", ", ".join(ls["name"] for ls in i["label_sets"]) or "none imported yet"),
        ("fingerprint", i["fingerprint"]),
    ]  # fmt: skip
    console.print(kv_table(str(store), rows))
    if i["label_sets"]:
        _print_label_sets([Path(ls["path"]) for ls in i["label_sets"]])


def _print_label_sets(paths: list[Path]) -> None:
    from pipeline.labels import LabelStore
    from pipeline.voc import CLASS_NAMES

    table = Table("set", "kind", "images", "pixels", "dropped", "top classes", title_justify="left",
                  title="imported label sets (labelled images, labelled pixel fraction, out-of-image clicks/points)")  # fmt: skip
    for path in paths:
        a = LabelStore.open(path).attrs
        hist = a["class_histogram"]
        top = sorted(range(1, len(hist)), key=lambda c: -hist[c])[:3]  # foreground classes
        names = [CLASS_NAMES[c] if len(hist) == len(CLASS_NAMES) else str(c) for c in top if hist[c]]
        table.add_row(a["name"], a["kind"], f"{a['images_labelled']} / {a['images']}", f"{100 * a['labelled_fraction']:.2f}%",
                      str(a["points_dropped"]), ", ".join(names))  # fmt: skip
    console.print(table)


@app.command()
def models() -> None:
    """List the backbones ssvt can build, with their size."""
    from pipeline.backbones import BACKBONES

    table = Table("name", "dim", "depth", "heads", "registers", "HF id", title="backbones")
    for spec in BACKBONES.values():
        table.add_row(spec.name, str(spec.hidden_size), str(spec.depth), str(spec.heads), str(spec.registers), spec.hf_id or "-")
    console.print(table)


# ---------------------------------------------------------------- stage two


class Schedule(StrEnum):
    poly = "poly"
    cosine = "cosine"


FeaturesOpt = Annotated[
    str | None, typer.Option(help="Cache folder under the workspace cache (e.g. dinov2_vitl14-448-last); default: the only one.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]


@app.command("train-head")
@errors_as_one_line
def train_head_cmd(
    labels: Annotated[
        str, typer.Option(help="Label set: a name from ssvt.toml [labels.*] (gt, scribble, point, seam, eps, vl) or a path.")
    ],
    head: Annotated[str, typer.Option(help="Head: linear, bn-linear (the DINOv2 protocol), mlp or conv.")] = "bn-linear",
    label_kind: Annotated[
        str | None, typer.Option(help="Kind of a label set given as a path (mask, scribble-xml, points-json, ...).")
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="Training feature store. Default: the workspace's train split in the cache.")
    ] = None,
    val_store: Annotated[
        Path | None,
        typer.Option(help="Validation store (evaluated at the end). Default: the val split next to the training store."),
    ] = None,
    gt: Annotated[str, typer.Option(help="Ground truth for the final evaluation: a label-set name or a mask folder.")] = "gt",
    features: FeaturesOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder. Default: <runs>/<labels>-<head>[-n].")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the labelled training images.")] = 30,
    min_steps: Annotated[int, typer.Option(help="Train at least this many steps (more epochs on small datasets).")] = 300,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    warmup: Annotated[float, typer.Option(help="Fraction of the steps spent warming the learning rate up.")] = 0.05,
    schedule: Annotated[Schedule, typer.Option(help="Learning-rate decay after warm-up.")] = Schedule.poly,
    pixels_per_image: Annotated[
        int | None, typer.Option(help="Dense labels: train on this many random labelled pixels per image (default: all).")
    ] = None,
    flip: Annotated[bool, typer.Option(help="Use the cached flipped view as augmentation when there is one.")] = True,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same head.")] = 0,
    device: DeviceOpt = "auto",
    strict: Annotated[bool, typer.Option(help="Fail when some images have no label instead of leaving them out.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Train a light head on cached features with (imperfect) labels, then evaluate it on the
    validation split when there is one. Writes a run folder (weights, config, metrics, curve)."""
    from pipeline.config import TrainConfig, label_source
    from pipeline.runs import train_and_evaluate

    ws = Workspace.find(config)
    cfg = TrainConfig(
        labels=labels, head=head, epochs=epochs, min_steps=min_steps, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup=warmup,
        schedule=schedule.value, pixels_per_image=pixels_per_image, flip=flip, seed=seed, device=device,
    )  # fmt: skip
    source = label_source(labels, ws, label_kind)
    gt_source = _optional_gt(gt, ws)
    with progress_bar("step/s") as bar:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int, loss: float | None = None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(
                tasks[stage], completed=done, total=total, description=stage if loss is None else f"{stage} loss {loss:.3f}"
            )

        outcome = train_and_evaluate(cfg, source, ws, store=store, val_store=val_store, gt=gt_source, features=features,
                                     out=out, strict=strict, progress=report)  # fmt: skip
    _print_run(outcome)


def _optional_gt(gt: str, ws: Workspace | None) -> Any:
    from pipeline.config import label_source

    if ws is not None and gt in ws.labels:
        return ws.labels[gt]
    return label_source(gt, ws) if Path(gt).exists() else None


def _print_run(outcome: Any) -> None:
    console.print(kv_table("train-head", [
        ("run", outcome.run_dir), ("labels", outcome.labels), ("images", outcome.train.images),
        ("epochs / steps", f"{outcome.train.epochs} / {outcome.train.steps}"),
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
        table.add_row(name, "-" if value is None else f"{100 * value:.1f}")
    console.print(table)
    tta = ", flip TTA" if result.flip_tta else ""
    console.print(
        f"[bold]mIoU {100 * result.miou:.1f}[/]  pixel accuracy {100 * result.pixel_accuracy:.1f}  ({result.images} images{tta})"
    )
    if result.skipped:
        err_console.print(Text(f"{len(result.skipped)} images without ground truth or features were skipped", style="yellow"))


@app.command()
@errors_as_one_line
def evaluate(
    run: Annotated[Path, typer.Argument(help="A train-head run folder.")],
    store: Annotated[
        Path | None, typer.Option(help="Validation feature store. Default: the val split next to the run's training store.")
    ] = None,
    gt: Annotated[str, typer.Option(help="Ground truth: a label-set name from ssvt.toml or a mask folder.")] = "gt",
    flip_tta: Annotated[bool, typer.Option(help="Average with the cached flipped view (needs extract --flip).")] = False,
    save_predictions: Annotated[
        Path | None, typer.Option(help="Write palette PNGs <id>.png at original resolution here.")
    ] = None,
    device: DeviceOpt = "auto",
    config: ConfigOpt = None,
) -> None:
    """Score a trained head as papers do: one confusion matrix over the split at original resolution."""
    from pipeline.config import label_source
    from pipeline.runs import evaluate_existing

    ws = Workspace.find(config)
    with progress_bar() as bar:
        task = bar.add_task("evaluate", total=None)
        result = evaluate_existing(run, label_source(gt, ws), ws, store=store, flip_tta=flip_tta,
                                   save_predictions=save_predictions, device=device,
                                   progress=functools.partial(_update_task, bar, task))  # fmt: skip
    _print_eval(result)
    console.print(
        f"wrote {run / 'metrics.json'}, {run / 'confusion.png'}"
        + (f", predictions in {save_predictions}" if save_predictions else "")
    )


# ---------------------------------------------------------------- pictures and the tour


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated integers like 2,4,6, got {text!r}") from None


@app.command("kmeans-viz")
@errors_as_one_line
def kmeans_viz_cmd(
    store: Annotated[
        Path | None, typer.Option(help="Feature store. Default: the workspace's validation split in the cache.")
    ] = None,
    features: FeaturesOpt = None,
    k: Annotated[str, typer.Option("--k", help="Cluster counts, comma-separated (one column each).")] = "2,4,6",
    ids: Annotated[str | None, typer.Option(help="Image ids, comma-separated. Default: --n random images.")] = None,
    n: Annotated[int, typer.Option(help="Random images to draw when --ids is not given.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the random choice and of K-means.")] = 0,
    joint: Annotated[
        bool, typer.Option(help="One K-means over all chosen images (co-segmentation): colours match across rows.")
    ] = False,
    normalize: Annotated[bool, typer.Option(help="L2-normalise tokens before clustering.")] = True,
    pca: Annotated[bool, typer.Option(help="Add a column with a 3-component PCA of the tokens as RGB.")] = True,
    gt: Annotated[
        str | None,
        typer.Option(
            help="Ground-truth label set (name or mask folder): adds a GT column and the Hungarian mIoU of the clusters."
        ),
    ] = "gt",
    out: Annotated[Path, typer.Option(help="Output folder (figure PNG+PDF, cluster maps, centroids, scores).")] = Path("kmeans"),
    config: ConfigOpt = None,
) -> None:
    """The shape-prior figure: K-means over each image's patch tokens, no labels needed."""
    from pipeline.config import label_source
    from pipeline.store import FeatureStore
    from pipeline.viz import KMeansVizConfig, kmeans_viz

    ws = Workspace.find(config)
    if store is None:
        if ws is None:
            raise ConfigError("no store: pass --store PATH.zarr or run where an ssvt.toml is")
        store = ws.find_store(ws.val_split or ws.train_split, features)
    gt_source = None
    if gt is not None and ((ws is not None and gt in ws.labels) or Path(gt).exists()):
        gt_source = label_source(gt, ws)
    cfg = KMeansVizConfig(ks=_int_list(k), ids=tuple(i.strip() for i in ids.split(",")) if ids else None, n=n, seed=seed,
                          joint=joint, normalize=normalize, pca=pca, num_classes=ws.num_classes if ws else 21)  # fmt: skip
    with progress_bar() as bar:
        task = bar.add_task("k-means", total=len(cfg.ids) if cfg.ids else n)
        result = kmeans_viz(FeatureStore.open(store), out, cfg, gt=gt_source, progress=lambda d: bar.advance(task, d))
    if result.mean_scores:
        table = Table("K", "cluster mIoU % (Hungarian, per-image mean)", title="shape in the features", title_justify="left")
        for kk, score in result.mean_scores.items():
            table.add_row(str(kk), f"{100 * score:.1f}")
        console.print(table)
    console.print(f"figure: {result.figures[0]} and {result.figures[1]}; maps and centroids in {result.out_dir}")


@app.command()
@errors_as_one_line
def demo(
    out: Annotated[Path, typer.Argument(help="Folder for the demo's data, caches, runs and figures.")] = Path("ssvt-demo"),
    quick: Annotated[bool, typer.Option(help="A smaller, faster tour (fewer images, steps and label sets).")] = False,
) -> None:
    """The whole pipeline on generated data, offline, on a CPU in about two minutes: toy dataset ->
    DINOv2 features -> a head per label type -> mIoU table and the K-means shape-prior figure."""
    from dataclasses import replace

    from pipeline.demo import DemoConfig, run_demo

    cfg = DemoConfig()
    if quick:
        cfg = replace(cfg, n_train=12, n_val=6, labels=("gt", "scribble", "seam"), kmeans_images=2,
                      train=replace(cfg.train, min_steps=40, batch_size=8))  # fmt: skip
    with progress_bar("it/s") as bar:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int, loss: float | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total, description=stage if loss is None else f"{stage} {loss:.3f}")

        result = run_demo(out, cfg, progress=report)
    _print_demo(result)


def _print_demo(result: Any) -> None:
    style = "green" if result.pretrained else "yellow"
    console.print(Text(f"features: {result.weights}", style=style))
    table = Table("labels", "val mIoU %", "pixel acc %", "train images", "train s", title="label types compared (toy val split)",
                  title_justify="left")  # fmt: skip
    for run in result.runs:
        ev = run.evaluation
        table.add_row(
            run.labels,
            f"{100 * ev.miou:.1f}",
            f"{100 * ev.pixel_accuracy:.1f}",
            str(run.train.images),
            f"{run.train.seconds:.1f}",
        )
    console.print(table)
    quality = ", ".join(f"{k.removeprefix('miou_')} {100 * v:.1f}" for k, v in result.pseudo_quality.items())
    console.print(f"pseudo-label quality vs ground truth (mIoU %): {quality}")
    if result.kmeans.mean_scores:
        shape = ", ".join(f"K={k}: {100 * v:.1f}" for k, v in result.kmeans.mean_scores.items())
        console.print(f"K-means clusters vs objects (Hungarian mIoU %): {shape}")
    console.print(f"\n[bold]outputs[/] in {result.out}:")
    console.print(f"  dataset + workspace   {result.out / 'VOC2012'}, {result.out / 'ssvt.toml'}")
    console.print(f"  feature stores        {result.out / 'cache'}   (ssvt info <store>)")
    console.print(
        f"  runs                  {result.out / 'runs'}/<labels>/  (head, config, metrics.json, curve.png, confusion.png)"
    )
    console.print(f"  K-means figure        {result.kmeans.figures[0]}")
