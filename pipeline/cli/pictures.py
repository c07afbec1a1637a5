"""``ssvt kmeans-viz`` and ``ssvt demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from pipeline.cli._common import (
    ConfigOpt,
    FeaturesOpt,
    app,
    console,
    errors_as_one_line,
    one_process,
    progress_bar,
    stage_bars,
)  # fmt: skip
from pipeline.errors import ConfigError
from pipeline.workspace import Workspace

# ---------------------------------------------------------------- pictures and the tour


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated integers like 2,4,6, got {text!r}") from None


@app.command("kmeans-viz")
@errors_as_one_line
@one_process("kmeans-viz")
def kmeans_viz_cmd(
    store_path: Annotated[
        str | None, typer.Option("--store", help="Feature store. Default: the workspace's validation split in the cache.")
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
            help="Ground-truth label source (name or mask folder): adds a GT column and the Hungarian mIoU of the clusters."
        ),
    ] = "gt",
    out: Annotated[Path, typer.Option(help="Output folder (figure PNG+PDF, cluster maps, centroids, scores).")] = Path("kmeans"),
    config: ConfigOpt = None,
) -> None:
    """The shape-prior figure: K-means over each image's patch tokens, no labels needed."""
    from collections import Counter

    from pipeline.cache.store import FeatureStore
    from pipeline.config import KMeansVizConfig
    from pipeline.figures.shape_prior import kmeans_viz
    from pipeline.workspace import optional_label_source

    ws = Workspace.find(config)
    if store_path is None:
        if ws is None:
            raise ConfigError("no store: pass --store PATH.zarr or run where an ssvt.toml is")
        store_path = str(ws.layout.find_store(ws.val_split or ws.train_split, features))
    gt_source = optional_label_source(gt, ws)
    cfg = KMeansVizConfig(ks=_int_list(k), ids=tuple(i.strip() for i in ids.split(",")) if ids else None, n=n, seed=seed,
                          joint=joint, normalize=normalize, pca=pca, num_classes=ws.num_classes if ws else 21)  # fmt: skip
    with progress_bar() as bar:
        task = bar.add_task("k-means", total=len(cfg.ids) if cfg.ids else n)
        result = kmeans_viz(FeatureStore.open(store_path), out, cfg, gt=gt_source, progress=lambda d: bar.advance(task, d))
    if result.mean_scores:
        table = Table("K", "cluster mIoU % (Hungarian, per-image mean)", title="shape in the features", title_justify="left")
        for kk, score in result.mean_scores.items():
            table.add_row(str(kk), f"{100 * score:.1f}")
        console.print(table)
    console.print(f"figure: {result.figures[0]} and {result.figures[1]}; maps and centroids in {result.out_dir}")
    top = [p.name for p in result.files if p.parent == result.out_dir and p not in result.figures]
    sub = Counter(p.parent.relative_to(result.out_dir) for p in result.files if p.parent != result.out_dir)
    folders = [f"{d}/ ({n} files)" for d, n in sorted(sub.items())]
    console.print(f"wrote {len(result.files)} files to {result.out_dir}: {', '.join([*top, *folders])}")


@app.command("demo")
@errors_as_one_line
@one_process("demo")
def demo_cmd(
    out: Annotated[Path, typer.Argument(help="Folder for the demo's data, caches, runs and figures.")] = Path("ssvt-demo"),
    quick: Annotated[bool, typer.Option(help="A smaller, faster tour (fewer images, steps and label sets).")] = False,
) -> None:
    """The whole pipeline on generated data, offline, on a CPU (1 min 41 s on a 2-core AMD EPYC).

    Toy dataset -> DINOv2 features -> a head per label type -> mIoU table and the K-means figure."""
    from dataclasses import replace

    from pipeline.config import DemoConfig
    from pipeline.toy.demo import run_demo

    cfg = DemoConfig()
    if quick:
        cfg = replace(cfg, n_train=12, n_val=6, labels=("gt", "scribble", "seam", "cam"), kmeans_images=2,
                      train=replace(cfg.train, min_steps=40, batch_size=8),
                      pseudo_masks=replace(cfg.pseudo_masks, min_steps=40, batch_size=8))  # fmt: skip
    with progress_bar("it/s") as bar:
        result = run_demo(out, cfg, progress=stage_bars(bar))
    _print_demo(result)


def _print_demo(result: Any) -> None:
    style = "green" if result.pretrained else "yellow"
    console.print(Text(f"features: {result.weights}", style=style))
    cam = result.pseudo_masks
    own = {k.removeprefix("miou_"): f"{100 * v:.1f}" for k, v in result.pseudo_quality.items() if k.startswith("miou_")}
    own["gt"] = "100"
    if cam is not None and cam.quality:
        own[cam.labels.name] = f"{100 * cam.quality['miou']:.1f}"
    table = Table("labels", "val mIoU %", "own mIoU %", "pixel acc %", "images", "train s",
                  title="label types compared (toy val split)", title_justify="left")  # fmt: skip
    for run in result.runs:
        ev = run.evaluation
        name = f"image-level ({run.labels})" if cam is not None and run.labels == cam.labels.name else run.labels
        table.add_row(
            name,
            f"{100 * ev.miou:.1f}",
            own.get(run.labels, "-"),
            f"{100 * ev.pixel_accuracy:.1f}",
            str(run.train.images),
            f"{run.train.seconds:.1f}",
        )
    console.print(table)
    partial = {"vl": result.pseudo_quality.get("vl_coverage")}
    if cam is not None and cam.quality:
        partial[cam.labels.name] = cam.quality["coverage"]
    shown = {run.labels for run in result.runs}
    covered = {name: c for name, c in partial.items() if c is not None and name in shown}
    note = "own mIoU: the training labels against ground truth on the train split"
    if covered:
        share = ", ".join(f"{name} {100 * c:.0f}%" for name, c in covered.items())
        they = "they label" if len(covered) > 1 else "it labels"
        note += f"; {' and '.join(covered)} only on the pixels {they} ({share} of the ground-truth pixels)"
    console.print(note)
    if cam is not None:
        console.print(
            f"image-level ({cam.labels.name}): CAM pseudo-masks from the image-level labels (ssvt pseudo-masks), "
            f"made in {cam.seconds:.1f} s, threshold {cam.threshold:.2f} ({cam.threshold_source})"
        )
    if result.kmeans.mean_scores:
        shape = ", ".join(f"K={k}: {100 * v:.1f}" for k, v in result.kmeans.mean_scores.items())
        console.print(f"K-means clusters vs objects (Hungarian mIoU %): {shape}")
    console.print(Text.assemble("\n", ("outputs", "bold"), f" in {result.out}:"))
    console.print(f"  dataset + workspace   {result.out / 'VOC2012'}, {result.out / 'ssvt.toml'}", markup=False)
    console.print(f"  feature stores        {result.out / 'cache'}   (ssvt info <store>)", markup=False)
    console.print(
        f"  runs                  {result.out / 'runs'}/<labels>/  (head, config, metrics.json, curve.png, confusion.png)",
        markup=False,
    )
    console.print(f"  K-means figure        {result.kmeans.figures[0]}", markup=False)
