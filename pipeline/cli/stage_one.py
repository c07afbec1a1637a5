"""``ssvt init``, ``make-toy``, ``extract``, ``info`` and ``models``."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from pipeline.cli._common import (
    ConfigOpt,
    _update_task,
    app,
    console,
    err_console,
    errors_as_one_line,
    kv_table,
    one_process,
    progress_bar,
)  # fmt: skip
from pipeline.config import ExtractConfig
from pipeline.errors import ConfigError
from pipeline.templates import INIT_TEMPLATE
from pipeline.workspace import WORKSPACE_FILE, Workspace

if TYPE_CHECKING:
    from pipeline.cache.names import Location
    from pipeline.distributed import Ranks

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
    console.print(f"wrote {path}: set [dataset] root and the label sources, then run `ssvt extract`", markup=False)


@app.command("make-toy")
@errors_as_one_line
@one_process("make-toy")
def make_toy_cmd(
    out: Annotated[Path, typer.Argument(help="Folder to write the toy dataset and its ssvt.toml into.")],
    n_train: Annotated[int, typer.Option(help="Training images.")] = 64,
    n_val: Annotated[int, typer.Option(help="Validation images.")] = 24,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Write a small synthetic dataset in the PASCAL VOC layout, with every label type, and its ssvt.toml.

    Labels in their real formats: scribbles (XML, PNG), points (JSON), pseudo-masks (seam, eps),
    vision-language masks and image-level cls_labels.npy."""
    from pipeline.toy.dataset import make_toy

    make_toy(out, n_train=n_train, n_val=n_val, seed=seed)
    console.print(f"wrote {n_train} train + {n_val} val images, their label sets and {out / WORKSPACE_FILE}", markup=False)
    console.print(f"next: cd {out} && ssvt extract --model dinov2_vits14   (add --random-init when no weights are cached)",
                  markup=False)  # fmt: skip


# ---------------------------------------------------------------- stage one


@app.command("extract")
@errors_as_one_line
def extract_cmd(
    model: Annotated[
        str, typer.Option(help="Backbone: a DINOv2 hub name (dinov2_vits14 ... dinov2_vitg14_reg); `ssvt models` lists them.")
    ] = "dinov2_vitl14",
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset: a VOC root, an images/ (+ masks/) folder, a plain image folder or a text file listing images. "
            "Default: the workspace's \\[dataset] root."
        ),
    ] = None,
    split: Annotated[
        list[str] | None,
        typer.Option(help="Split(s) to extract (VOC ImageSets/Segmentation/<split>.txt). Default: the workspace's splits."),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(help="Store path or URL (one split). Default: <cache>/<model>-<size>-<layers>/<split>.zarr."),
    ] = None,
    size: Annotated[
        int,
        typer.Option(
            help="Canvas side in pixels, a multiple of the model's patch size (14 for DINOv2): images are resized "
            "so the longer side is this, then padded to a square."
        ),
    ] = 448,
    layers: Annotated[
        str,
        typer.Option(help="Blocks to cache: last, last4 (concatenated as DINOv2's '+ms' head reads them) or indices: 8,9,10,11"),
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
    part: Annotated[
        str | None,
        typer.Option(
            metavar="I/N",
            help="Write only part I of N (1-based, e.g. 2/4), for job arrays and machines started by hand without "
            "torchrun: part I takes the missing shards whose number k has k mod N = I-1, so parts never write the same "
            "shard, whenever each starts. Every part runs the same command and may create the store; a plain "
            "`ssvt extract` afterwards finishes what is left. With SLURM: --part $((SLURM_ARRAY_TASK_ID+1))/"
            "$SLURM_ARRAY_TASK_COUNT for --array=0-(N-1). Not with --overwrite (a part would delete the others' "
            "shards); under torchrun leave it out: the ranks share the work.",
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run a frozen DINOv2 once over a dataset and cache its patch tokens in a sharded zarr store.

    Rerunning the same command after a crash finishes the missing shards only. Under
    `torchrun --nproc_per_node=N -m pipeline.cli extract ...` the N processes share the shards (one GPU
    each); the store is the same, byte for byte."""
    from pipeline.distributed import Ranks
    from pipeline.features.extract import extract, load_backbone, plan_extract

    cfg = ExtractConfig(
        model=model, size=size, layers=layers, flip=flip, weights=str(weights) if weights else None,
        random_init=random_init, batch_size=batch_size, workers=workers, device=device,
        images_per_shard=images_per_shard, strict=strict,
    )  # fmt: skip
    targets = plan_extract(cfg, Workspace.find(config), data=data, splits=split, out=out)
    ranks = Ranks.from_options(part)
    try:
        loading = console.status(Text(f"loading {model} and hashing its weights"))
        with loading if ranks.reports else contextlib.nullcontext():
            backbone = load_backbone(cfg)  # once for every split
        for split_name, items, store_path in targets:
            if not ranks.reports:  # other ranks of a group print nothing but errors
                extract(items, store_path, cfg, overwrite=overwrite, backbone=backbone, ranks=ranks)
                continue
            with progress_bar() as bar:
                task = bar.add_task(f"extract {split_name}{_who(ranks)}", total=None)
                summary = extract(
                    items, store_path, cfg, overwrite=overwrite, backbone=backbone, ranks=ranks,
                    progress=functools.partial(_update_task, bar, task),
                )  # fmt: skip
            _print_extract_summary(split_name, summary)
    finally:
        ranks.close()


def _who(ranks: Ranks) -> str:
    """What the progress bar adds after the split: `` (2 processes)`` under torchrun, `` (part 2/4)`` for
    a part of a job array, nothing for a single process."""
    if ranks.group:
        return f" ({ranks.world} processes)"
    return f" ({ranks.label})" if ranks.label else ""


def _print_extract_summary(split: str, s: Any) -> None:
    rows = [
        ("store", s.store_path), ("images", s.n_images), ("extracted now", s.images_done),
        ("shards written / already done", f"{s.shards_written} / {s.shards_skipped}"),
        ("unreadable images", len(s.failed)), ("device", s.device), ("weights", s.weights_source),
        ("time", f"{s.seconds:.1f} s"), ("throughput", f"{s.images_per_s:.1f} img/s"),
    ]  # fmt: skip
    if s.processes > 1:
        rows.insert(-2, ("processes", s.processes))
    if s.shards_missing:
        left = f"{s.shards_missing} (the other parts write them; a plain `ssvt extract` finishes them)"
        rows.insert(4, ("shards still missing", left))
    console.print(kv_table(f"extract {split}", rows))
    for path, error in s.failed:
        err_console.print(Text(f"unreadable: {path}: {error}", style="yellow"))


@app.command()
@errors_as_one_line
def info(store_path: Annotated[str, typer.Argument(metavar="STORE", help="A feature store (.zarr folder or URL).")]) -> None:
    """Describe a feature store: model, grid, views, images, completeness, size on disk, label sets."""
    from pipeline.cache.names import location
    from pipeline.cache.store import FeatureStore

    store = FeatureStore.open(store_path)
    i = store.info()
    gib = 2**30
    rows = [
        ("backbone", i["backbone"]),
        ("weights", f"{str(store.attrs.get('weights_sha256', ''))[:12]}… ({store.attrs.get('weights_source', '?')})"),
        ("layers", ", ".join(map(str, i["layers"]))),
        ("canvas / grid", f"{i['size']} px / {i['grid'][0]} x {i['grid'][1]} tokens of {i['patch']} px"),
        ("channels", i["channels"]), ("views", ", ".join(i["views"])),
        ("images", f"{i['n_images']} ({i['ok']} ok, {i['failed']} unreadable, {i['not_written']} not written yet)"),
        ("complete", f"{'yes' if i['complete'] else 'NO'}: {i['done_shards']} of {i['n_shards']} shards"
                     f" ({i['images_per_shard']} images per shard)"),
        ("bytes on disk", f"{i['bytes_on_disk'] / gib:.3f} GiB (raw tokens {i['raw_token_bytes'] / gib:.3f} GiB)"),
        ("label sets", ", ".join(ls["name"] for ls in i["label_sets"]) or "none imported yet"),
        ("fingerprint", i["fingerprint"]),
    ]  # fmt: skip
    console.print(kv_table(str(store_path), rows))
    if i["label_sets"]:
        _print_label_sets([location(ls["path"]) for ls in i["label_sets"]])  # a URL stays a URL


def _print_label_sets(paths: list[Location]) -> None:
    from pipeline.cache.labels import LabelSet
    from pipeline.cache.voc import CLASS_NAMES

    table = Table("set", "kind", "images", "pixels", "dropped", "top classes", "quality", title_justify="left",
                  title="label sets (labelled images, labelled pixel fraction, out-of-image clicks/points, "
                        "quality vs ground truth from ssvt score-labels)")  # fmt: skip
    for path in paths:
        a = LabelSet.open(path).attrs
        hist = a["class_histogram"]
        top = sorted(range(1, len(hist)), key=lambda c: -hist[c])[:3]  # foreground classes
        names = [CLASS_NAMES[c] if len(hist) == len(CLASS_NAMES) else str(c) for c in top if hist[c]]
        table.add_row(Text(a["name"]), a["kind"], f"{a['images_labelled']} / {a['images']}",
                      f"{100 * a['labelled_fraction']:.2f}%", str(a["points_dropped"]), ", ".join(names),
                      _quality(a.get("quality")))  # fmt: skip
    console.print(table)


def _quality(quality: dict[str, Any] | None) -> str:
    """'mIoU 69.0, coverage 100 %' (dense), 'precision 98.1, coverage 5.8 %' (sparse), '-' when not scored."""
    if not quality:
        return "-"
    if quality.get("miou") is not None:
        head = f"mIoU {100 * quality['miou']:.1f}"
    elif quality.get("pixel_accuracy") is not None:
        head = f"precision {100 * quality['pixel_accuracy']:.1f}"
    else:
        return "-"
    return f"{head}, coverage {100 * quality['coverage']:.1f} %" if "coverage" in quality else head


@app.command()
def models(
    all_: Annotated[bool, typer.Option("--all", help="Also list the test-sized models (random init or a local file).")] = False,
) -> None:
    """List the backbones ssvt can build: family, patch size, width, depth, registers and where weights come from."""
    from pipeline.features.backbones import get_spec, list_backbones

    specs = [get_spec(name) for name in list_backbones(include_test=all_)]
    gated = {spec.family: spec.licence for spec in specs if spec.licence}
    caption = "; ".join(f"{family} weights are gated: accept the {licence} first" for family, licence in gated.items())
    table = Table(title="backbones, one section per family", caption=caption or None, box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True)
    for column in ("patch", "dim", "depth", "heads", "reg."):
        table.add_column(column, no_wrap=True, justify="right")
    table.add_column("HF id", overflow="fold")
    for before, spec in zip([None, *specs], specs, strict=False):
        if before is not None and spec.family != before.family:
            table.add_section()
        sizes = (spec.patch, spec.hidden_size, spec.depth, spec.heads, spec.registers)
        table.add_row(spec.name, *map(str, sizes), spec.hf_id or "-")
    console.print(table)
