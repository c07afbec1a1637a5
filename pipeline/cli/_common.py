"""Shared pieces of the ``ssvt`` command line: the app, consoles, one-line errors, progress bars.

Usage: ``from pipeline.cli._common import app, console`` in a command module.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from pipeline.errors import ConfigError, SsvtError
from pipeline.workspace import WORKSPACE_FILE

#: Seconds between plain progress lines when stdout is not a terminal (a file, a CI log); the
#: environment variable SSVT_PROGRESS_EVERY overrides it (0: a line at every update).
PROGRESS_EVERY = 30.0

app = typer.Typer(
    name="ssvt",
    help="Semantic segmentation from imperfect labels on cached, frozen DINOv2 features.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
# Long paths stay on one line, copyable. Strings are read as rich markup, which drops a [word] in
# brackets: print user text (paths, names, messages) as Text, with markup=False or rich.markup.escape.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": False}

ConfigOpt = Annotated[Path | None, typer.Option("--config", help=f"Workspace file (default: ./{WORKSPACE_FILE} when present).")]

FeaturesOpt = Annotated[
    str | None, typer.Option(help="Cache folder under the workspace cache (e.g. dinov2_vitl14-448-last); default: the only one.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]

# Options that train-head and finetune share, with one wording.
GtOpt = Annotated[str, typer.Option(help="Ground truth for the final evaluation: a label source name or a mask folder.")]
EpochsOpt = Annotated[int | None, typer.Option(help="Passes over the labelled images; alternative to --iterations.")]
MinStepsOpt = Annotated[int, typer.Option(help="With --epochs: train at least this many steps (more epochs on small datasets).")]
WarmupItersOpt = Annotated[int | None, typer.Option(help="Warm-up steps instead of --warmup (official: 1,500).", metavar="N")]
PolyPowerOpt = Annotated[float, typer.Option(help="Power of the poly decay (official: 1.0).")]
PixelsOpt = Annotated[
    int | None, typer.Option(help="Dense labels: train on this many random labelled pixels per image (default: all).")
]
StrictOpt = Annotated[bool, typer.Option(help="Fail when some images have no label instead of leaving them out.")]


def _print_version(value: bool) -> None:
    if value:
        from pipeline import __version__

        console.print(f"ssvt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log library messages.")] = False,
) -> None:
    _state["debug"] = debug
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO if verbose else logging.WARNING)  # run folders still get INFO in train.log
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def errors_as_one_line(fn: F) -> F:
    """Print an ssvt, file-system or object-storage client error as one red line and exit 1 (a traceback
    only with --debug)."""

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
        except Exception as exc:  # the object-storage client's own errors (missing credentials, no endpoint)
            from pipeline.cache.remote import client_error_message

            line = client_error_message(exc)
            if line is None or _state["debug"]:
                raise
            err_console.print(Text(f"error: {line}", style="bold red"))
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


#: The commands that share their work over the ranks of torchrun; the others refuse to run under it.
SHARED_OVER_RANKS = ("extract", "train-head", "ablate")


def one_process(command: str) -> Callable[[F], F]:
    """Refuse ``command`` under torchrun (``WORLD_SIZE`` > 1) with one line: every rank would do all of
    it and write the same files at once. Goes below :func:`errors_as_one_line`."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
                raise ConfigError(
                    f"`ssvt {command}` runs as one process, not under torchrun (only {', '.join(SHARED_OVER_RANKS)} "
                    "share their work over ranks); run it without torchrun"
                )
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


class RateColumn(ProgressColumn):
    """Items per second: rich's recent-speed estimate, else the average since the start."""

    def __init__(self, unit: str = "img/s"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(_rate(task, self.unit), style="progress.data.speed")


def _rate(task: Task, unit: str) -> str:
    elapsed = task.elapsed or 0.0
    speed = task.finished_speed or task.speed or (task.completed / elapsed if elapsed > 0 else None)
    return f"{speed:,.1f} {unit}" if speed else f"- {unit}"


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


_NOUNS = {"img/s": "images", "step/s": "steps", "cell/s": "cells"}


class ProgressBars(Progress):
    """Bars that appear with the first progress report (a command failing before it prints its error
    line alone), are cleared when the command fails, and, when stdout is not a terminal, become a
    plain line per task every ``every`` seconds and when it finishes."""

    def __init__(self, *columns: str | ProgressColumn, unit: str, every: float, **kwargs: Any):
        super().__init__(*columns, **kwargs)
        self.unit, self.every = unit, every
        self._logged: dict[TaskID, float] = {}  # task -> time of its last line
        self._done: set[TaskID] = set()  # tasks whose last line is printed

    def __enter__(self) -> ProgressBars:
        return self  # drawn from the first report on

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.live.transient = True
        elif not self._draws():
            for task in self.tasks:
                if task.id not in self._done and task.completed:
                    self._log(task)
        if self.live.is_started:
            self.stop()

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def _draws(self) -> bool:
        return self.console.is_terminal and not self.console.is_dumb_terminal

    def _report(self, task_id: TaskID) -> None:
        if self._draws():
            if not self.live.is_started:
                self.start()
            return
        task = next(t for t in self.tasks if t.id == task_id)
        now = self.get_time()
        if task.finished or now - self._logged.get(task_id, task.start_time or now) >= self.every:
            if task_id not in self._done:
                self._log(task)
            self._logged[task_id] = now

    def _log(self, task: Task) -> None:
        noun = _NOUNS.get(self.unit)
        count = f"{task.completed:.0f}" if task.total is None else f"{task.completed:.0f}/{task.total:.0f}"
        parts = [_rate(task, self.unit)]
        if task.finished:
            parts.append(f"done in {_clock(task.finished_time or 0.0)}")
            self._done.add(task.id)
        elif task.time_remaining is not None:
            parts.append(f"eta {_clock(task.time_remaining)}")
        self.console.print(Text(f"{task.description}: {count}{' ' + noun if noun else ''} ({', '.join(parts)})"))


def progress_bar(unit: str = "img/s") -> ProgressBars:
    """Progress bars for ``with progress_bar() as bar:``; see :class:`ProgressBars`."""
    every = os.environ.get("SSVT_PROGRESS_EVERY", str(PROGRESS_EVERY))
    try:
        seconds = float(every)
    except ValueError:
        raise ConfigError(f"SSVT_PROGRESS_EVERY is seconds between progress lines, got {every!r}") from None
    return ProgressBars(
        TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
        RateColumn(unit), TextColumn("eta"), TimeRemainingColumn(),
        unit=unit, every=seconds, console=console, transient=False,
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


def run_folder(out: str | None) -> Path | None:
    """``--out`` of a command that writes a run folder: a local ``Path`` (a URL is refused in one line;
    run folders stay local, only stores and caches may be URLs), or None for the default."""
    from pipeline.cache.names import local_only

    return None if out is None else local_only(out, "--out (the run folder)")


def kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    """Two columns, key and value, printed as they are (a path like data[1]/x keeps its brackets)."""
    table = Table(title=escape(title), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(escape(key), escape(str(value)))
    return table
