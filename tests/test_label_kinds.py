"""The label-kind registry: what each kind is good for, bare-path guesses, and a new kind added with one
registration that import, the config, ground truth and the CLI help all pick up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.geometry import IGNORE, Geometry, mask_to_canvas
from pipeline.cache.label_kinds import (
    LABEL_KINDS,
    KindReader,
    LabelKind,
    LabelSource,
    dense_kinds,
    get_label_kind,
    guess_kind,
    register_label_kind,
)
from pipeline.cache.labels import ensure_labels
from pipeline.cache.store import FeatureStore
from pipeline.cache.voc import NUM_CLASSES
from pipeline.config import ExtractConfig
from pipeline.errors import ConfigError
from pipeline.features.data import find_images
from pipeline.features.extract import extract
from pipeline.workspace import Workspace, label_source


def test_registry_says_what_each_kind_is_good_for():
    assert list(LABEL_KINDS) == ["mask", "rgb-mask", "scribble-xml", "scribble-png", "points-json", "cls-labels"]
    assert [k for k, v in LABEL_KINDS.items() if v.sparse] == ["scribble-xml", "scribble-png", "points-json"]
    assert [k for k, v in LABEL_KINDS.items() if not v.trainable] == ["cls-labels"]
    assert dense_kinds() == ["mask", "rgb-mask"]
    assert all(v.help for v in LABEL_KINDS.values())


@pytest.mark.parametrize(
    ("path", "kind"),
    [("pts.json", "points-json"), ("cls_labels.NPY", "cls-labels"), ("SegmentationClass", "mask"), ("x.png", "mask")],
)
def test_bare_paths_guess_their_kind(path, kind):
    assert guess_kind(path) == kind


def test_unknown_kind_names_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"kind 'polygons'; valid kinds are mask, rgb-mask, .*cls-labels"):
        LabelSource("x", "polygons", tmp_path)
    with pytest.raises(ConfigError, match="unknown label kind 'polygons'"):
        get_label_kind("polygons")


def test_sparse_and_image_level_kinds_are_no_ground_truth(tmp_path):
    for kind in ("scribble-xml", "scribble-png", "points-json", "cls-labels"):
        source = LabelSource("s", kind, tmp_path)
        with pytest.raises(ConfigError, match=r"evaluation needs dense masks \(kinds mask, rgb-mask\)"):
            source.require_dense("evaluation")
    LabelSource("m", "mask", tmp_path).require_dense()


# --- a kind registered by a plugin ----------------------------------------------------------------


class NpyMaskReader(KindReader):
    """Masks saved as ``<id>.npy`` (H, W) uint8 arrays: a format ssvt does not ship."""

    def original(self, image_id: str, geom: Geometry | None = None) -> tuple[Path, np.ndarray] | None:
        path = self.source.path / f"{image_id}.npy"
        return (path, np.load(path)) if path.is_file() else None

    def canvas(self, image_id: str, geom: Geometry) -> np.ndarray | None:
        found = self.original(image_id, geom)
        if found is None:
            return None
        self.check_classes(found[1], str(found[0]))
        return mask_to_canvas(found[1], geom)


@pytest.fixture
def npy_kind():
    kind = register_label_kind(LabelKind("npy-mask", "masks as .npy arrays", NpyMaskReader, dense=True, suffixes=(".npyd",)))
    yield kind
    del LABEL_KINDS["npy-mask"]


def test_a_registered_kind_imports_like_a_builtin_one(npy_kind, toy, tmp_path):
    """The same masks as .npy files import to exactly the label set the PNG masks give."""
    ws = Workspace.load(toy.workspace)
    folder = tmp_path / "npy"
    folder.mkdir()
    for png in sorted(ws.labels["eps"].path.glob("*.png")):
        np.save(folder / f"{png.stem}.npy", np.asarray(Image.open(png)))
    store_path = tmp_path / "cache" / "train.zarr"
    extract(
        find_images(toy.voc_root, "train"), store_path, ExtractConfig(model="vit_tiny_test", random_init=True, size=56, workers=0)
    )
    store = FeatureStore.open(store_path)
    ours = ensure_labels(LabelSource("eps_npy", "npy-mask", folder), store, num_classes=NUM_CLASSES)
    reference = ensure_labels(ws.labels["eps"], store, num_classes=NUM_CLASSES)
    everything = np.arange(store.n_images)
    np.testing.assert_array_equal(ours.masks(everything), reference.masks(everything))
    assert (ours.kind, ours.sparse) == ("npy-mask", False)
    assert (ours.masks(everything) != IGNORE).any()
    assert label_source(str(folder), None, "npy-mask").kind == "npy-mask"  # --label-kind accepts it
    assert guess_kind("masks.npyd") == "npy-mask"


def test_a_registered_kind_is_valid_in_ssvt_toml(npy_kind, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "ssvt.toml").write_text('[dataset]\nroot = "."\n[labels.mine]\nkind = "npy-mask"\npath = "m"\n')
    assert Workspace.load(tmp_path / "ssvt.toml").labels["mine"].spec is npy_kind


def test_a_registered_kind_appears_in_train_head_help():
    plugin = (
        "from pipeline.cache.label_kinds import LabelKind, MaskReader, register_label_kind\n"
        "register_label_kind(LabelKind('npy-mask', 'masks as npy arrays', MaskReader, dense=True))\n"
        "from pipeline.cli import app\n"
        "app(['train-head', '--help'], prog_name='ssvt', standalone_mode=False)\n"
    )
    env = {"COLUMNS": "400", "PATH": "/usr/bin:/bin", "TERM": "dumb"}
    out = subprocess.run([sys.executable, "-c", plugin], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.replace("│", " ").split())
    assert "npy-mask (masks as npy arrays)" in text
    assert "points-json (What's the Point clicks" in text
