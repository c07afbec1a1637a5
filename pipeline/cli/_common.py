"""Shared pieces of the ``ssvt`` command line: the app, consoles, one-line errors, progress bars.

Usage: ``from pipeline.cli._common import app, console`` in a command module.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from pipeline.config import WORKSPACE_FILE
from pipeline.errors import SsvtError

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

FeaturesOpt = Annotated[
    str | None, typer.Option(help="Cache folder under the workspace cache (e.g. dinov2_vitl14-448-last); default: the only one.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]


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
    """Print an ssvt or file-system error as one red line and exit 1 (a traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SsvtError, OSError, KeyboardInterrupt) as exc:
            # OSError: a full disk or a read-only folder outside the stores' own checks still gets
            # one line naming the path (the errno text says what happened).
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


def stage_bars(bar: Progress, loss_label: str = "") -> Callable[..., None]:
    """A progress callback ``(stage, done, total, loss=None)`` that draws one bar per stage, the loss
    (after ``loss_label``) in its description when given."""
    tasks: dict[str, Any] = {}

    def report(stage: str, done: int, total: int, loss: float | None = None) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        description = stage if loss is None else f"{stage} {loss_label}{loss:.3f}"
        bar.update(tasks[stage], completed=done, total=total, description=description)

    return report


def _update_task(bar: Progress, task: Any, done: int, total: int) -> None:
    bar.update(task, completed=done, total=total)


def kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table
