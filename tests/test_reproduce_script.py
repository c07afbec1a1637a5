"""scripts/reproduce_voc.sh: its dry run prints commands that the current CLI accepts, and writes nothing.

The recipe itself needs VOC, the label sets, DINOv2 ViT-L weights and a GPU; only its dry run and its
input check run here (docs/reproduce.md).
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import typer

from pipeline.cli import app
from pipeline.cli.ablation import train_overrides
from pipeline.config import AblateConfig, TrainConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_voc.sh"


def _run(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)  # fmt: skip


def _commands(stdout: str) -> list[list[str]]:
    """The ``ssvt ...`` commands of a dry run, split as bash would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ssvt ")]


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.parametrize("how", [("--dry-run",), ()])
def test_dry_run_prints_commands_and_writes_nothing(tmp_path, how):
    out = _run(tmp_path, *how, **({} if how else {"DRY_RUN": "1"}))
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []
    commands = _commands(out.stdout)
    assert [c[1] for c in commands] == ["extract"] * 5 + ["score-labels"] * 3 + ["ablate"] * 2
    labels, ms = commands[-2], commands[-1]
    assert labels[labels.index("--labels") + 1] == "gt,scribble,point,seam,eps,vl"
    assert labels[labels.index("--heads") + 1] == "bn-linear,linear"
    assert labels[labels.index("--protocol") + 1] == "lin"
    assert ms[ms.index("--protocol") + 1] == "ms"
    for grid in (labels, ms):
        assert grid[grid.index("--seeds") + 1] == "3"
        assert grid[grid.index("--iterations") + 1] == "40000"
    assert "[labels.vl]" in out.stdout
    assert "ablations/voc-labels/table.md" in out.stdout


def test_every_printed_command_parses_with_the_current_cli(tmp_path):
    """Each command's options exist with these values; ablate's extra options are train-head ones."""
    out = _run(tmp_path, "--dry-run", WEIGHTS="/weights dir/dinov2_vitl14_pretrain.pth")
    group = typer.main.get_command(app)
    commands = _commands(out.stdout)
    assert commands
    for command in commands:
        sub = group.commands[command[1]]  # type: ignore[attr-defined]
        ctx = sub.make_context(command[1], command[2:])  # parses and checks the options, runs nothing
        if command[1] == "ablate":  # the values, too: heads, axes, protocol; train-head options
            p = ctx.params
            AblateConfig(name=p["name"], labels=tuple(p["labels"].split(",")), heads=tuple(p["heads"].split(",")),
                         features=(p["features"],), seeds=p["seeds"], rows=p["rows"], cols=p["cols"],
                         protocol=p["protocol"], train=TrainConfig(**train_overrides(list(ctx.args))))  # fmt: skip
        else:
            assert not ctx.args, command
    extract = commands[0]
    assert extract[extract.index("--weights") + 1] == "/weights dir/dinov2_vitl14_pretrain.pth"


@pytest.mark.parametrize("score_split", ["", "train_aug"])
def test_without_ms_scoring_on_the_training_split(tmp_path, score_split):
    out = _run(tmp_path, "--dry-run", MS="0", SCORE_SPLIT=score_split, LABELS="gt,eps", POINTS_BG="")
    commands = _commands(out.stdout)
    assert [c[1] for c in commands] == ["extract", "extract", "score-labels", "ablate"]
    assert "last4" not in out.stdout
    assert commands[2][-1].endswith("/train_aug.zarr")
    assert "background =" not in out.stdout


def test_missing_inputs_are_named_before_anything_runs(tmp_path):
    out = _run(tmp_path, VOC_ROOT=str(tmp_path / "nowhere"), SEAM=str(tmp_path / "no-seam"))
    assert out.returncode == 1
    assert "VOC_ROOT:" in out.stderr
    assert "SEAM:" in out.stderr
    assert "+ ssvt" not in out.stdout
    assert list(tmp_path.iterdir()) == []
