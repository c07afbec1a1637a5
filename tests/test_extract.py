import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from pipeline.cache.store import FeatureStore
from pipeline.config import ExtractConfig
from pipeline.errors import ConfigError, DataError, StoreMismatchError
from pipeline.features.data import find_images
from pipeline.features.extract import Forward, extract, shard_batches

TINY = {"model": "vit_tiny_test", "random_init": True, "size": 56, "workers": 0, "batch_size": 3, "images_per_shard": 4}
#: The tiny model with 16-pixel patches (position table kept at 37 x 37), as ExtractConfig asks for it.
PATCH16 = {"model": "vit_tiny_test", "overrides": {"patch_size": 16}}


def arrays(path: Path) -> dict[str, np.ndarray]:
    s = FeatureStore.open(path)
    return {"tokens": s.read_tokens(0, s.n_images), "cls": s.read_cls(), "geometry": s.geometry(), "status": s.status()}


def test_extract_writes_complete_store(toy, tmp_path):
    items = find_images(toy.voc_root, "val")
    out = tmp_path / "val.zarr"
    seen = []
    summary = extract(items, out, ExtractConfig(**TINY, flip=True), progress=lambda d, t: seen.append((d, t)))
    s = FeatureStore.open(out)
    assert s.is_complete()
    assert s.n_images == 8
    assert s.n_views == 2
    assert s.grid == (4, 4)
    assert s.channels == 48
    assert summary.images_done == 8
    assert summary.shards_written == 2
    assert not summary.failed
    assert seen[0] == (0, 8)
    assert seen[-1] == (8, 8)
    tokens = s.read_tokens(0, 8)
    assert tokens.dtype == np.float16
    assert np.isfinite(tokens).all()
    assert np.abs(tokens).sum() > 0
    # Geometry row matches the image on disk.
    h, w = np.asarray(Image.open(items[3].path)).shape[:2]
    assert tuple(s.geometry()[3, :2]) == (h, w)
    assert s.attrs["backbone"] == "vit_tiny_test"
    assert s.attrs["layers"] == [2]
    assert s.attrs["size"] == 56
    # A rerun finds nothing to do.
    again = extract(items, out, ExtractConfig(**TINY, flip=True))
    assert again.images_done == 0
    assert again.shards_skipped == 2


def test_flipped_view_is_the_model_on_the_mirrored_canvas(toy, tmp_path):
    from pipeline.features.backbones import build_backbone
    from pipeline.features.data import CanvasDataset

    items = find_images(toy.voc_root, "val")[:2]
    extract(items, tmp_path / "s.zarr", ExtractConfig(**TINY, flip=True))
    s = FeatureStore.open(tmp_path / "s.zarr")
    bb = build_backbone("vit_tiny_test", None, seed=0)
    _, pixels, _, _ = CanvasDataset(items, 56, bb.mean, bb.std)[1]
    ref, _ = bb(pixels.flip(-1)[None], (2,))
    np.testing.assert_allclose(s.read_tokens(1, 2)[0, 1], ref[0].numpy(), atol=2e-3, rtol=1e-2)


def test_settings_mismatch_is_refused_naming_differences(toy, tmp_path):
    items = find_images(toy.voc_root, "val")
    out = tmp_path / "val.zarr"
    extract(items, out, ExtractConfig(**TINY))
    with pytest.raises(StoreMismatchError, match=r"size: store has 56, this run has 112.*--overwrite"):
        extract(items, out, ExtractConfig(**{**TINY, "size": 112}))
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        extract(items, out, ExtractConfig(**{**TINY, "seed": 1}))
    with pytest.raises(StoreMismatchError, match="layers"):
        extract(items, out, ExtractConfig(**{**TINY, "layers": "0,1"}))
    summary = extract(items, out, ExtractConfig(**{**TINY, "size": 112}), overwrite=True)
    assert summary.images_done == 8
    assert FeatureStore.open(out).size == 112


def test_corrupt_image_reported_and_run_goes_on(toy, tmp_path):
    items = find_images(toy.voc_root, "val")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(Path(items[0].path).read_bytes()[:200])
    items[5] = type(items[5])("broken", bad)
    out = tmp_path / "s.zarr"
    summary = extract(items, out, ExtractConfig(**TINY))
    assert [p for p, _ in summary.failed] == [str(bad)]
    s = FeatureStore.open(out)
    assert s.is_complete()
    assert s.status().tolist() == [1] * 5 + [2] + [1] * 2
    assert np.abs(s.read_tokens(5, 6)).sum() == 0
    with pytest.raises(DataError, match=r"broken\.jpg"):
        extract(items, tmp_path / "strict.zarr", ExtractConfig(**TINY, strict=True))
    kept = FeatureStore.open(tmp_path / "strict.zarr")
    assert kept.done_shards().tolist() == [True, False]  # the shard before the bad image is kept


def test_store_at_patch_16_holds_the_model_tokens_and_records_its_patch(toy, tmp_path):
    from pipeline.features.backbones import build_backbone
    from pipeline.features.data import CanvasDataset

    items = find_images(toy.voc_root, "val")[:3]
    cfg = ExtractConfig(**{**TINY, **PATCH16, "size": 64}, flip=True)
    extract(items, tmp_path / "s.zarr", cfg)
    s = FeatureStore.open(tmp_path / "s.zarr")
    assert (s.patch, s.attrs["patch"], s.size, s.grid) == (16, 16, 64, (4, 4))
    assert s.attrs["extract_config"]["overrides"] == {"patch_size": 16}  # the online protocols rebuild it
    bb = build_backbone("vit_tiny_test", None, overrides=PATCH16["overrides"], seed=0)
    assert bb.patch_size == 16
    _, pixels, geometry, _ = CanvasDataset(items, 64, bb.mean, bb.std)[2]
    ref, _ = bb(torch.stack([pixels, pixels.flip(-1)]), (2,))
    assert ref.shape == (2, 4, 4, 48)
    np.testing.assert_allclose(s.read_tokens(2, 3)[0], ref.numpy(), atol=2e-3, rtol=1e-2)
    np.testing.assert_array_equal(s.geometry()[2], geometry.numpy())


def test_size_not_a_multiple_of_the_patch_is_one_line_before_any_work(toy, tmp_path):
    from pipeline.cache.names import CacheLayout
    from pipeline.features.extract import load_backbone, plan_extract, resolved_patch, store_path

    items = find_images(toy.voc_root, "val")
    cases = [(PATCH16, 56, 16, 64), ({"model": "vit_tiny_test"}, 64, 14, 70), ({"model": "dinov2_vitl14"}, 450, 14, 448)]
    for model, size, patch, near in cases:
        cfg = ExtractConfig(**{**TINY, **model, "size": size})
        message = f"size must be a multiple of the patch size {patch} of {cfg.model}, got {size} (try {near})"
        for call in (
            lambda cfg=cfg: resolved_patch(cfg),
            lambda cfg=cfg: load_backbone(cfg),
            lambda cfg=cfg: store_path(cfg, CacheLayout(tmp_path), "val"),
            lambda cfg=cfg: plan_extract(cfg, None, data=toy.voc_root, out=tmp_path / "x.zarr"),
            lambda cfg=cfg: extract(items, tmp_path / "x.zarr", cfg),
        ):
            with pytest.raises(ConfigError) as info:
                call()
            assert str(info.value) == message
    assert not (tmp_path / "x.zarr").exists()
    at_64 = ExtractConfig(**{**TINY, **PATCH16, "size": 64})
    assert resolved_patch(at_64) == 16
    with pytest.raises(ConfigError, match="patch size 16 of vit_tiny_test, got 56"):  # the backbone handed in decides
        extract(items, tmp_path / "x.zarr", ExtractConfig(**TINY), backbone=load_backbone(at_64))


def test_store_written_before_the_patch_attribute_opens_as_14_and_resumes(toy, tmp_path):
    items = find_images(toy.voc_root, "val")
    out = tmp_path / "old.zarr"
    extract(items, out, ExtractConfig(**TINY))
    expected = arrays(out)
    meta = json.loads((out / "zarr.json").read_text())  # as ssvt wrote it before `patch` (schema 1)
    del meta["attributes"]["patch"]
    (out / "zarr.json").write_text(json.dumps(meta))
    zarr.open_array(out / "shard_done", mode="r+")[1] = 0  # an unfinished run
    old = FeatureStore.open(out)
    assert (old.patch, old.grid, old.info()["patch"]) == (14, (4, 4), 14)
    assert old.missing_shards() == [1]
    summary = extract(items, out, ExtractConfig(**TINY))
    assert (summary.shards_written, summary.shards_skipped) == (1, 1)
    assert "patch" not in json.loads((out / "zarr.json").read_text())["attributes"]  # metadata is written once
    for name, value in arrays(out).items():
        np.testing.assert_array_equal(value, expected[name])


def test_batches_never_straddle_shards(toy, tmp_path):
    items = find_images(toy.voc_root, "val")
    extract(items, tmp_path / "s.zarr", ExtractConfig(**{**TINY, "images_per_shard": 3}))
    s = FeatureStore.open(tmp_path / "s.zarr")  # shards [0, 3), [3, 6), [6, 8)
    assert shard_batches(s, [0, 2], 2) == [[0, 1], [2], [6, 7]]


KILL_SCRIPT = """
import sys, time
from pipeline.config import ExtractConfig
from pipeline.features.data import find_images
from pipeline.features.extract import extract
cfg = ExtractConfig(model="vit_tiny_test", random_init=True, size=56, workers=0, batch_size=2, images_per_shard=2)
slow = sys.argv[3] == "slow"
extract(find_images(sys.argv[1], "train"), sys.argv[2], cfg, progress=lambda d, t: time.sleep(0.3 if slow and d else 0))
"""


def test_resume_after_kill_gives_identical_store(toy, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    proc = subprocess.Popen([sys.executable, str(script), str(toy.voc_root), str(killed), "slow"])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if FeatureStore.exists(killed) and 2 <= FeatureStore.open(killed).done_shards().sum() < 8:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = FeatureStore.open(killed)
    assert 2 <= partial.done_shards().sum() < 8, "the run was not killed part-way"
    subprocess.run([sys.executable, str(script), str(toy.voc_root), str(killed), "fast"], check=True)
    subprocess.run([sys.executable, str(script), str(toy.voc_root), str(clean), "fast"], check=True)
    assert FeatureStore.open(killed).is_complete()
    a, b = arrays(killed), arrays(clean)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    attrs_a = {k: v for k, v in FeatureStore.open(killed).attrs.items() if k != "created"}
    attrs_b = {k: v for k, v in FeatureStore.open(clean).attrs.items() if k != "created"}
    assert attrs_a == attrs_b


class _OomAbove(torch.nn.Module):
    """A stand-in backbone that runs out of (CUDA) memory on batches larger than ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.sizes = limit, []

    def forward(self, x: torch.Tensor, layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return x[:, :1, ::14, ::14].permute(0, 2, 3, 1).repeat(1, 1, 1, 4), x[:, :, 0, 0]


def test_out_of_memory_halves_the_batch_and_keeps_results():
    fake = _OomAbove(limit=3)
    forward = Forward(fake, (0,), torch.device("cpu"), flip=True, chunk=8)
    pixels = torch.randn(8, 3, 28, 28)
    tokens, cls = forward(pixels)
    assert forward.chunks.chunk == 1  # with the flip a chunk of c images is 2c rows: only c = 1 fits under 3
    assert tokens.shape == (8, 2, 2, 2, 4)
    assert cls.shape == (8, 2, 3)
    np.testing.assert_allclose(tokens[:, 0, :, :, 0], pixels[:, 0, ::14, ::14].numpy(), atol=1e-3)
    np.testing.assert_allclose(tokens[:, 1, :, :, 0], pixels.flip(-1)[:, 0, ::14, ::14].numpy(), atol=1e-3)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Forward(_OomAbove(limit=0), (0,), torch.device("cpu"), flip=False, chunk=4)(pixels)
