"""The ``ssvt ablate`` picture: a grouped bar chart of mean mIoU with error bars (std over seeds).

Usage::

    stats = {("eps", "linear"): (0.71, 0.004), ("eps", "bn-linear"): (0.74, 0.003), ...}   # (row, col) -> (mean, std)
    ablation_figure(stats, ["gt", "eps"], ["linear", "bn-linear"], Path("ablations/grid/table.png"))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from pipeline.config import DPI
from pipeline.errors import ConfigError
from pipeline.figures.plots import _new_figure


def ablation_figure(
    stats: Mapping[tuple[str, str], tuple[float, float]],
    rows: Sequence[str],
    cols: Sequence[str],
    path: Path,
    *,
    title: str | None = None,
    dpi: int = DPI,
) -> Path:
    """One group of bars per row value, one bar per column value (a colour each), height = mean mIoU
    in %, error bar = std; a missing cell leaves a gap. Writes a PNG at ``path``."""
    if not rows or not cols:
        raise ConfigError("an ablation figure needs at least one row and one column")
    fig = _new_figure(1.2 + 0.35 * len(rows) * (len(cols) + 1), 3.6, dpi)
    ax = fig.subplots()
    width = 0.8 / len(cols)
    colors = colormaps["tab10"](np.arange(len(cols)) % 10)
    x = np.arange(len(rows))
    for j, col in enumerate(cols):
        means = [100 * stats[r, col][0] if (r, col) in stats else np.nan for r in rows]
        stds = [100 * stats[r, col][1] if (r, col) in stats else 0.0 for r in rows]
        ax.bar(x + (j - (len(cols) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=col, color=colors[j])
    ax.set_xticks(x, labels=list(rows), rotation=30 if max(len(r) for r in rows) > 8 else 0, ha="right")
    ax.set_ylabel("mIoU %")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, frameon=False, ncols=min(len(cols), 4))
    if title:
        ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
