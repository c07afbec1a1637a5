"""The ``ssvt`` command line. Each command parses its flags, builds a config and calls one library
function; progress bars and tables are drawn here and nowhere else (the only package importing
typer and rich).

Usage: ``ssvt --help``; ``ssvt demo``; ``ssvt extract --model dinov2_vitl14``.
"""

# Importing the command modules registers their commands, in this order in `ssvt --help`.
from pipeline.cli import stage_one, stage_two, finetune, evaluation, ablation, pictures  # noqa: I001
from pipeline.cli._common import app

__all__ = ["ablation", "app", "evaluation", "finetune", "pictures", "stage_one", "stage_two"]
