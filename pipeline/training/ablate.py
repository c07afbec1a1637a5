"""``ssvt ablate``: a grid of label sets x heads x feature stores x seeds, trained, evaluated and tabled.

Usage::

    cfg = AblateConfig(name="labels", labels=("gt", "eps", "scribble"), heads=("linear", "bn-linear"), seeds=3)
    grid = run_ablation(cfg, ws, gt=ws.labels["gt"])
    print(grid.table)                      # also ablations/labels/table.md, table.png, results.csv/json

Every cell is a train-head run folder ``ablations/<name>/cells/<labels>-<head>-<features>-seed<k>``;
a cell whose metrics file exists is done, so a rerun trains only what is missing and a killed grid
loses at most the cells in flight. Label sets are imported once per store. Cells on one store that
share a seed (and their training images) train in one pass over the features: each batch is read
once and every head steps on it, giving the same heads as separate runs
(:func:`pipeline.training.train.train_heads`). A failing cell is recorded
in failed.json and the others go on. With ``protocol`` "lin" or "ms" all cells are evaluated together
afterwards (one backbone pass per backbone). Numbers in the tables are the cells' own metrics files.

Under ``torchrun`` the passes are dealt over the ranks (:func:`deal_passes`; cells, not data-parallel
heads, are the unit: heads train in minutes). Each cell trains on one rank exactly as it would in one
process, so the tables are the ones one process writes. Rank 0 checks the grid folder and imports the
label sets before the others start, and writes failed.json, the protocol evaluation and the tables
after they finish; each rank writes only its own cells' folders.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.labels import LabelSet, ensure_labels
from pipeline.cache.names import AblationFiles, Location, RunFiles, label_set_path
from pipeline.cache.store import FeatureStore
from pipeline.config import AblateConfig, TrainConfig
from pipeline.distributed import Ranks
from pipeline.errors import ConfigError, SsvtError
from pipeline.training.runs import StageProgress, open_label_set, resolve_labels, train_many_and_evaluate
from pipeline.training.train import HeadJob, fuse_key
from pipeline.workspace import Workspace

log = logging.getLogger(__name__)

LABELS_ROW = "labels themselves"


@dataclass(frozen=True)
class Cell:
    """One grid cell: what is trained on what."""

    labels: str
    head: str
    features: str  # the cache folder of the training store
    seed: int

    @property
    def name(self) -> str:
        return f"{self.labels}-{self.head}-{self.features}-seed{self.seed}"

    def axis(self, name: str) -> str:
        return {"labels": self.labels, "heads": self.head, "features": self.features, "seeds": str(self.seed)}[name]

    def train_config(self, cfg: AblateConfig) -> TrainConfig:
        return replace(cfg.train, labels=self.labels, head=self.head, seed=self.seed)


@dataclass
class GridResult:
    files: AblationFiles
    rows: list[dict[str, Any]]  # one per finished cell (results.csv)
    failed: list[dict[str, str]]
    trained: list[str]  # cells trained by this call (the others were done already)
    table: str


def plan(cfg: AblateConfig, ws: Workspace) -> tuple[list[Cell], dict[str, Location]]:
    """The cells in order, and the training store of each features name."""
    stores = {}
    for name in cfg.features or (None,):
        path = ws.layout.find_store(ws.train_split, name)
        stores[path.parent.name] = path
    cells = [Cell(lab, head, feat, seed) for feat, lab, head, seed in
             itertools.product(stores, cfg.labels, cfg.heads, range(cfg.seeds))]  # fmt: skip
    return cells, stores


def _check_grid(files: AblationFiles, cfg: AblateConfig) -> None:
    """Refuse to resume a grid folder made with other training settings (cells would not be comparable)."""
    wanted = cfg.train.to_dict()
    if files.grid.exists():
        before = json.loads(files.grid.read_text()).get("train")
        if before != wanted:
            diffs = sorted(k for k in wanted if before.get(k) != wanted[k]) if before else ["all"]
            raise ConfigError(f"{files.dir} holds a grid trained with other settings ({', '.join(diffs)}); choose another --name")
    files.dir.mkdir(parents=True, exist_ok=True)
    files.grid.write_text(json.dumps(cfg.to_dict(), indent=2))


def _label_sets(
    cfg: AblateConfig, ws: Workspace, stores: dict[str, Location], progress: StageProgress
) -> dict[tuple[str, str], str]:
    """Import every label source once per store. Returns (features, labels) -> the label set to train
    on, or an error message (its cells fail with it)."""
    sets: dict[tuple[str, str], str] = {}
    errors: dict[tuple[str, str], str] = {}
    for feat, path in stores.items():
        store = FeatureStore.open(path)
        for label in cfg.labels:
            try:
                source = resolve_labels(label, ws, store_path=path)
                if isinstance(source, LabelSource):
                    ensure_labels(source, store, num_classes=ws.num_classes, progress=_stage(progress, f"import {label}"))
                sets[feat, label] = label
            except SsvtError as exc:
                errors[feat, label] = str(exc)
    return {**sets, **{k: f"error: {v}" for k, v in errors.items()}}


def _stage(progress: StageProgress, stage: str) -> Callable[[int, int], None]:
    return lambda done, total: progress(stage, done, total, None)


@dataclass
class _Work:
    """What rank 0 prepares for every rank: the failures known before, the missing cells, the label set
    of each (features, labels) (or "error: ..."), and each rank's passes (:func:`deal_passes`)."""

    failed: dict[str, str]
    todo: list[Cell]
    sets: dict[tuple[str, str], str]
    shares: list[list[list[Cell]]]


def run_ablation(
    cfg: AblateConfig,
    ws: Workspace,
    *,
    gt: LabelSource | None,
    progress: StageProgress | None = None,
    ranks: Ranks | None = None,
) -> GridResult:
    """Train and evaluate every missing cell of ``cfg``, then write results and tables (module docstring).

    With ``ranks`` of a process group (torchrun) the cells are shared out over the ranks and only rank 0
    reports ``progress``; every rank returns the same result, and an error on one rank stops them all."""
    ranks = ranks or Ranks.single()
    if ranks.world > 1 and not ranks.group:
        raise ConfigError("a grid is shared out over the ranks of torchrun, not over parts of a job array (--part)")
    report: StageProgress = progress if progress is not None and ranks.is_main else (lambda *_: None)
    cells, stores = plan(cfg, ws)
    files = AblationFiles(ws.layout.ablation_dir(cfg.name))
    work = ranks.on_main(lambda: _prepare(cfg, ws, cells, stores, files, report, ranks.world), "preparing the grid")
    mine = {c.name for unit in work.shares[ranks.rank] for c in unit}
    outcomes: dict[str, str | None] = {}  # cell -> None (trained) or its error; filled as cells finish
    error: BaseException | None = None
    try:
        _train_cells([c for c in work.todo if c.name in mine], work.sets, cfg, ws, stores, files, gt, report, outcomes)
    except Exception as exc:  # recorded with the others' outcomes, then every rank stops
        error = exc
    everyone = ranks.gather(outcomes)
    trained = ranks.on_main(lambda: _record(files, work, everyone), "recording the failures")
    ranks.check(error, "training the cells")
    return ranks.on_main(lambda: _tables(cfg, ws, gt, cells, stores, files, trained), "writing the tables")


def _prepare(
    cfg: AblateConfig, ws: Workspace, cells: list[Cell], stores: dict[str, Location], files: AblationFiles,
    report: StageProgress, world: int,
) -> _Work:  # fmt: skip
    """Check the grid folder, import the label sets and share the missing cells out (rank 0 alone)."""
    _check_grid(files, cfg)
    failed: dict[str, str] = json.loads(files.failures.read_text()) if files.failures.exists() else {}
    todo = [c for c in cells if not RunFiles(files.cell(c.name)).metrics.exists()]
    sets = _label_sets(cfg, ws, stores, report) if todo else {}
    return _Work(failed, todo, sets, deal_passes(passes(todo, cfg, stores, sets), world))


def passes(
    cells: list[Cell], cfg: AblateConfig, stores: dict[str, Location], sets: dict[tuple[str, str], str]
) -> list[list[Cell]]:
    """``cells`` grouped as they train: the cells of one store whose jobs share a
    :func:`~pipeline.training.train.fuse_key` train in one pass (the run folder plays no part in the
    key); a cell that cannot train is its own."""
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for feat, path in stores.items():
        store = FeatureStore.open(path)
        for cell in (c for c in cells if c.features == feat):
            key: tuple[Any, ...] = ("alone", cell.name)
            labels = sets.get((feat, cell.labels), "error: not imported")
            if not labels.startswith("error: "):
                with contextlib.suppress(SsvtError):  # the cell fails when it trains, alone
                    key = fuse_key(store, HeadJob(open_label_set(store, labels), cell.train_config(cfg), Path(cell.name)))
            groups.setdefault(key, []).append(cell)
    return list(groups.values())


def deal_passes(units: list[list[Cell]], world: int) -> list[list[list[Cell]]]:
    """Each rank's share of the passes: while there are fewer passes than ranks the largest is split
    in two (a pass of k heads costs about k heads' training, plus one read of the features), then
    the largest first, each to the rank with the fewest cells so far. Splitting changes no head
    (heads in one pass equal separate runs, bit for bit)."""
    units = sorted(units, key=len, reverse=True)
    while 0 < len(units) < world and len(units[0]) > 1:
        big = units.pop(0)
        units = sorted([*units, big[: (len(big) + 1) // 2], big[(len(big) + 1) // 2 :]], key=len, reverse=True)
    shares: list[list[list[Cell]]] = [[] for _ in range(world)]
    loads = [0] * world
    for unit in units:
        rank = loads.index(min(loads))
        shares[rank].append(unit)
        loads[rank] += len(unit)
    return shares


def _train_cells(
    cells: list[Cell], sets: dict[tuple[str, str], str], cfg: AblateConfig, ws: Workspace, stores: dict[str, Location],
    files: AblationFiles, gt: LabelSource | None, report: StageProgress, outcomes: dict[str, str | None],
) -> None:  # fmt: skip
    """Train and evaluate ``cells`` (this rank's), store by store, in as few passes as their settings
    allow; ``outcomes[cell]`` is None for a trained cell, else its error."""
    for feat, path in stores.items():
        jobs, runnable = [], []
        for cell in (c for c in cells if c.features == feat):
            labels = sets[cell.features, cell.labels]
            if labels.startswith("error: "):
                outcomes[cell.name] = labels.removeprefix("error: ")
                continue
            jobs.append((cell.train_config(cfg), labels, files.cell(cell.name)))
            runnable.append(cell)
        report("cells", len(outcomes), len(cells), None)
        results = train_many_and_evaluate(jobs, ws, store_path=path, gt=gt, progress=report) if jobs else []
        for cell, outcome in zip(runnable, results, strict=True):
            if isinstance(outcome, SsvtError):
                shutil.rmtree(files.cell(cell.name), ignore_errors=True)
                outcomes[cell.name] = str(outcome)
                log.warning("cell %s failed: %s", cell.name, outcome)
            else:
                outcomes[cell.name] = None
    report("cells", len(cells), len(cells), None)


def _record(files: AblationFiles, work: _Work, everyone: list[dict[str, str | None]]) -> list[str]:
    """Merge every rank's outcomes into failed.json; returns the cells trained now, in grid order."""
    failed = dict(work.failed)
    merged = {name: outcome for outcomes in everyone for name, outcome in outcomes.items()}
    for name, outcome in merged.items():
        if outcome is None:
            failed.pop(name, None)
        else:
            failed[name] = outcome
    files.failures.write_text(json.dumps(failed, indent=2))
    return [c.name for c in work.todo if c.name in merged and merged[c.name] is None]


def _tables(
    cfg: AblateConfig, ws: Workspace, gt: LabelSource | None, cells: list[Cell], stores: dict[str, Location],
    files: AblationFiles, trained: list[str],
) -> GridResult:  # fmt: skip
    """The protocol evaluation when asked, then results.csv/json, table.md and table.png (rank 0 alone)."""
    if cfg.protocol != "cache" and gt is not None:
        _evaluate_protocol(cfg, files, cells, ws, gt)
    rows = results(files, cells, cfg.protocol)
    quality = _label_quality(cfg, ws, stores, gt) if gt is not None else {}
    table = write_results(files, rows, cfg, quality)
    failed = json.loads(files.failures.read_text())
    return GridResult(files, rows, [{"cell": k, "error": v} for k, v in failed.items()], trained, table)


def _evaluate_protocol(cfg: AblateConfig, files: AblationFiles, cells: list[Cell], ws: Workspace, gt: LabelSource) -> None:
    from pipeline.inference.evaluate import evaluate_runs

    done = [RunFiles(files.cell(c.name)) for c in cells]
    missing = [run.dir for run in done if run.metrics.exists() and not run.metrics_for(cfg.protocol).exists()]
    if missing:
        evaluate_runs(missing, gt, protocol=cfg.protocol, workspace=ws, device=cfg.train.device)


def results(files: AblationFiles, cells: list[Cell], protocol: str = "cache") -> list[dict[str, Any]]:
    """One row per finished cell, read from its metrics file."""
    rows = []
    for cell in cells:
        run = RunFiles(files.cell(cell.name))
        metrics_file = run.metrics_for(protocol)
        if not metrics_file.exists():
            continue
        m = json.loads(metrics_file.read_text())
        row = {"cell": cell.name, "labels": cell.labels, "head": cell.head, "features": cell.features, "seed": cell.seed,
               "protocol": protocol, "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"],
               "train_seconds": m.get("train_seconds"), "run": str(run.dir)}  # fmt: skip
        row.update({f"iou_{k}": v for k, v in m["per_class_iou"].items()})
        rows.append(row)
    return rows


def _label_quality(cfg: AblateConfig, ws: Workspace, stores: dict[str, Location], gt: LabelSource) -> dict[str, float | None]:
    """The mIoU of each dense label set itself against ground truth, on the first store's images."""
    from pipeline.training.label_quality import score_labels

    path = next(iter(stores.values()))
    store = FeatureStore.open(path)
    out: dict[str, float | None] = {}
    for label in cfg.labels:
        try:
            labels = LabelSet.open(label_set_path(path, label))
            source = resolve_labels(label, ws, store_path=path)
            quality = score_labels(labels, store, gt, source=source if isinstance(source, LabelSource) else None,
                                   num_classes=ws.num_classes, names=ws.classes)  # fmt: skip
            out[label] = quality.miou
        except SsvtError as exc:
            log.info("labels %r not scored: %s", label, exc)
            out[label] = None
    return out


def table_cells(rows: list[dict[str, Any]], row_axis: str, col_axis: str) -> dict[tuple[str, str], list[float]]:
    """(row value, column value) -> the mIoUs of its seeds."""
    key = {"labels": "labels", "heads": "head", "features": "features", "seeds": "seed"}
    grouped: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        grouped.setdefault((str(row[key[row_axis]]), str(row[key[col_axis]])), []).append(row["miou"])
    return grouped


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _fmt(values: list[float] | None) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def write_results(files: AblationFiles, rows: list[dict[str, Any]], cfg: AblateConfig, quality: dict[str, float | None]) -> str:
    """results.csv/json, table.md and table.png; returns the table text (markdown)."""
    files.results_json.write_text(json.dumps(rows, indent=2))
    with files.results_csv.open("w", newline="") as f:
        fields = list(rows[0]) if rows else ["cell"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    grouped = table_cells(rows, cfg.rows, cfg.cols)
    row_keys = list(dict.fromkeys(k[0] for k in grouped))
    col_keys = list(dict.fromkeys(k[1] for k in grouped))
    lines = [f"| {cfg.rows} \\ {cfg.cols} | " + " | ".join(col_keys) + " |", "|---" * (len(col_keys) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(_fmt(grouped.get((r, c))) for c in col_keys) + " |" for r in row_keys]
    if quality and "labels" in (cfg.rows, cfg.cols):
        lines = _with_quality(lines, row_keys, col_keys, cfg, quality)
    seeds = f"mean ± std over {cfg.seeds} seeds" if cfg.seeds > 1 else "one seed"
    text = f"mIoU % ({cfg.protocol} evaluation, {seeds})\n\n" + "\n".join(lines) + "\n"
    files.table_md.write_text(text)
    if rows:
        from pipeline.figures.ablation import ablation_figure

        stats = {k: mean_std(v) for k, v in grouped.items()}
        ablation_figure(stats, row_keys, col_keys, files.table_png, title=f"{cfg.name}: mIoU ({cfg.protocol})")
    return text


def _with_quality(lines: list[str], rows: list[str], cols: list[str], cfg: AblateConfig, q: dict[str, float | None]) -> list[str]:
    """Add the labels' own mIoU: a column when label sets are the rows, a row when they are the columns."""

    def fmt(name: str) -> str:
        value = q.get(name)
        return "-" if value is None else f"{100 * value:.1f}"

    if cfg.rows == "labels":
        lines[0] = lines[0][:-1] + f"| {LABELS_ROW} |"
        lines[1] += "---|"
        return lines[:2] + [line + f" {fmt(r)} |" for line, r in zip(lines[2:], rows, strict=True)]
    return [*lines, f"| {LABELS_ROW} | " + " | ".join(fmt(c) for c in cols) + " |"]
