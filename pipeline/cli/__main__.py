"""``python -m pipeline.cli``: the ``ssvt`` command, for launchers that take a module
(``torchrun --nproc_per_node=8 -m pipeline.cli extract ...``)."""

from pipeline.cli import app

if __name__ == "__main__":
    app(prog_name="ssvt")
