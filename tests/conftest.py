"""Shared fixtures: a small toy dataset written once per test session (read-only for tests)."""

from __future__ import annotations

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
