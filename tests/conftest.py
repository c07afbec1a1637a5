"""Shared fixtures: a small toy dataset written once per test session (read-only for tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ExtractConfig
from pipeline.features.data import find_images
from pipeline.features.extract import extract, store_path
from pipeline.toy.dataset import ToyDataset, make_toy
from pipeline.workspace import Workspace


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> ToyDataset:
    """16 train + 8 val toy images in the VOC layout with every label set. Do not write into it."""
    return make_toy(tmp_path_factory.mktemp("toy"), n_train=16, n_val=8, seed=0)


@pytest.fixture(scope="session")
def toy_with_empty_labels(toy: ToyDataset, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, ExtractConfig], Workspace]:
    """``make(name, cfg)``: a copy of the toy workspace with a label source ``empty`` that labels no
    pixel (the cells of a grid trained on it fail), its train and val splits extracted with ``cfg``."""

    def make(name: str, cfg: ExtractConfig) -> Workspace:
        root = tmp_path_factory.mktemp(name) / "toy"
        shutil.copytree(toy.root, root)
        empty = root / "labels" / "empty"
        empty.mkdir()
        for image_id in toy.train_ids:
            h, w = np.asarray(Image.open(root / "VOC2012" / "SegmentationClass" / f"{image_id}.png")).shape
            Image.fromarray(np.full((h, w), 255, np.uint8)).save(empty / f"{image_id}.png")
        with (root / "ssvt.toml").open("a") as f:
            f.write('\n[labels.empty]\nkind = "mask"\npath = "labels/empty"\n')
        ws = Workspace.load(root / "ssvt.toml")
        for split in ("train", "val"):
            extract(find_images(ws.data_root, split), store_path(cfg, ws.layout, split), cfg)
        return ws

    return make


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
