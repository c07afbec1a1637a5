"""Shared fixtures: a small toy dataset written once per test session (read-only for tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.toy.dataset import ToyDataset, make_toy


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> ToyDataset:
    """16 train + 8 val toy images in the VOC layout with every label set. Do not write into it."""
    return make_toy(tmp_path_factory.mktemp("toy"), n_train=16, n_val=8, seed=0)


@pytest.fixture
def toy_copy(toy: ToyDataset, tmp_path: Path) -> Path:
    """A private copy of the toy folder, for tests that write caches or runs next to it."""
    import shutil

    dst = tmp_path / "toy"
    shutil.copytree(toy.root, dst)
    return dst


def _modules_loaded_by(code: str, *prefixes: str) -> list[str]:
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in {list(prefixes)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def modules_loaded_by() -> Callable[..., list[str]]:
    """``modules_loaded_by(code, *prefixes)``: run ``code`` in a fresh interpreter and list the loaded
    modules under ``prefixes`` (``"torch"`` matches ``torch`` and ``torch.nn``, not ``torchvision``)."""
    return _modules_loaded_by
