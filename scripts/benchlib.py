"""Helpers shared by the benchmark scripts: a plain-text table and CPU accounting for noisy machines.

Usage (from a script in this folder): ``from benchlib import cpu_seconds, print_table``.
"""

from __future__ import annotations

import os


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its reaped children)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def print_table(header: tuple, rows: list[tuple]) -> None:
    """Right-aligned columns, one row per line."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(x).rjust(wd) for x, wd in zip(row, widths, strict=True)))
