"""``ssvt finetune``: the backbone trains on a copy (the frozen one stays bit-identical), backbone lr 0
is train-head, layer decay sets the documented rates, checkpointing keeps the gradients, and a run
folder evaluates online under cache and lin, refusing weights that are not its own."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pipeline.cache.labels import ensure_labels
from pipeline.cache.names import RunFiles
from pipeline.cache.store import FeatureStore
from pipeline.cli import app
from pipeline.config import ExtractConfig, FinetuneConfig, TrainConfig
from pipeline.errors import ConfigError, StoreMismatchError
from pipeline.features import checkpoints
from pipeline.features.backbones import build_backbone, to_official_state_dict
from pipeline.features.data import find_images
from pipeline.features.extract import extract, store_path
from pipeline.features.tunable import TunableBackbone, layer_decay_groups
from pipeline.inference.evaluate import evaluate_runs
from pipeline.inference.predict import predict
from pipeline.inference.protocols import PROTOCOLS, Protocol
from pipeline.training.evaluate import evaluate, load_run, score_head
from pipeline.training.finetune import Tuner, finetune, pretrained_backbone
from pipeline.training.train import train_head
from pipeline.workspace import Workspace

TINY = ExtractConfig(model="vit_tiny_test", random_init=True, size=56, workers=0, flip=True)
CFG = TrainConfig(lr=2e-2, iterations=5, batch_size=8, device="cpu", memory="ram")
SMALL = Protocol("lin", scale=(2048, 56), ratios=(1.0,), flip=False, crop=42, stride=28)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, toy) -> Workspace:
    """The toy workspace with train/val extracted by the tiny model (with the flipped view) and gt imported."""
    root = tmp_path_factory.mktemp("finetune") / "toy"
    shutil.copytree(toy.root, root)
    w = Workspace.load(root / "ssvt.toml")
    for split in ("train", "val"):
        extract(find_images(w.data_root, split), store_path(TINY, w.layout, split), TINY)
    ensure_labels(w.labels["gt"], train_store(w), num_classes=w.num_classes)
    return w


def train_store(w: Workspace) -> FeatureStore:
    return FeatureStore.open(store_path(TINY, w.layout, "train"))


def run_finetune(w: Workspace, out: Path, ft: FinetuneConfig, **kwargs) -> Path:
    store = train_store(w)
    labels = ensure_labels(w.labels["gt"], store, num_classes=w.num_classes)
    finetune(store, labels, CFG, ft, out, num_classes=w.num_classes, **kwargs)
    return out


@pytest.fixture(scope="module")
def tuned_run(ws, tmp_path_factory) -> Path:
    return run_finetune(ws, tmp_path_factory.mktemp("runs") / "tuned", FinetuneConfig(backbone_lr=1e-3, workers=0))


@pytest.fixture(scope="module")
def zero_run(ws, tmp_path_factory) -> Path:
    return run_finetune(ws, tmp_path_factory.mktemp("runs") / "zero", FinetuneConfig(backbone_lr=0.0, workers=0))


def test_finetune_tunes_a_copy_and_the_frozen_backbone_stays_bit_identical(ws, tmp_path):
    frozen = pretrained_backbone(train_store(ws))
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    run = run_finetune(ws, tmp_path / "run", FinetuneConfig(backbone_lr=1e-3, workers=0), backbone=frozen)
    after = frozen.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.train().training  # the frozen wrapper still refuses train mode
    tuned = load_file(str(RunFiles(run).backbone))
    official = to_official_state_dict(frozen)
    assert tuned.keys() == official.keys()
    changed = [k for k in tuned if not torch.equal(tuned[k], official[k])]
    assert any(k.startswith("blocks.0.") for k in changed)
    assert any(k.startswith("blocks.2.") for k in changed)
    recorded = json.loads(RunFiles(run).config.read_text())["finetune"]
    assert recorded["backbone_sha256"] == checkpoints.fingerprint(tuned) != recorded["pretrained_sha256"]
    assert recorded["pretrained_sha256"] == frozen.fingerprint == train_store(ws).identity.weights_sha256
    assert recorded["backbone_lr"] == 1e-3
    assert recorded["layer_decay"] == 1.0
    assert recorded["precision"] == "fp32"


def test_train_head_leaves_the_frozen_backbone_bit_identical(ws, tmp_path):
    frozen = pretrained_backbone(train_store(ws))
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    store = train_store(ws)
    train_head(store, ensure_labels(ws.labels["gt"], store, num_classes=ws.num_classes), CFG, tmp_path / "head", num_classes=21)
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    assert frozen.fingerprint == store.identity.weights_sha256


def test_backbone_lr_zero_keeps_the_backbone_and_trains_the_head_as_train_head(ws, zero_run, tmp_path):
    frozen = pretrained_backbone(train_store(ws))
    tuned = load_file(str(RunFiles(zero_run).backbone))
    official = to_official_state_dict(frozen)
    assert all(torch.equal(tuned[k], official[k]) for k in official)  # lr 0: AdamW moves nothing, weight decay included
    recorded = json.loads(RunFiles(zero_run).config.read_text())["finetune"]
    assert recorded["backbone_sha256"] == recorded["pretrained_sha256"]
    # the same head, batches, flips and schedule as train-head on the cached tokens (float16 there, float32 here)
    store = train_store(ws)
    cached = train_head(store, ensure_labels(ws.labels["gt"], store, num_classes=21), CFG, tmp_path / "head", num_classes=21)
    online = json.loads(RunFiles(zero_run).history.read_text())
    np.testing.assert_allclose(online["loss"], cached.history["loss"], rtol=1e-4)
    assert online["lr"] == cached.history["lr"]
    head_online, _ = load_run(zero_run)
    head_cached, _ = load_run(tmp_path / "head")
    for (name, a), b in zip(head_online.state_dict().items(), head_cached.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4, msg=name)


def test_layer_decay_gives_each_block_its_documented_rate(ws, tmp_path):
    tuned = TunableBackbone.from_frozen(pretrained_backbone(train_store(ws)))
    groups = {g["name"]: g for g in layer_decay_groups(tuned, 1e-3, 0.5)}
    assert list(groups) == ["embeddings", "block 0", "block 1", "block 2", "norm"]  # vit_tiny_test: 3 blocks
    expected = {"embeddings": 1e-3 * 0.5**3, "block 0": 1e-3 * 0.5**2, "block 1": 1e-3 * 0.5, "block 2": 1e-3, "norm": 1e-3}
    assert {n: g["lr"] for n, g in groups.items()} == pytest.approx(expected)
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in tuned.parameters())  # each parameter in exactly one group
    assert {id(p) for p in groups["block 1"]["params"]} == {id(p) for p in tuned.model.encoder.layer[1].parameters()}
    # the optimiser finetune builds: the head first at --lr, then these groups
    store = train_store(ws)
    labels = ensure_labels(ws.labels["gt"], store, num_classes=21)
    ft = FinetuneConfig(backbone_lr=1e-3, layer_decay=0.5)
    tuner = Tuner(tuned, store, labels, torch.zeros(1), 21, CFG, ft, 5, tmp_path, torch.device("cpu"))
    rates = {g["name"]: g["initial_lr"] for g in tuner.optim.param_groups}
    assert rates == pytest.approx({"head": CFG.lr, **expected})


def test_layer_decay_of_one_gives_every_group_the_backbone_rate(ws):
    tuned = TunableBackbone.from_frozen(pretrained_backbone(train_store(ws)))
    assert {g["lr"] for g in layer_decay_groups(tuned, 1e-5)} == {1e-5}


def test_grad_checkpointing_recomputes_blocks_and_keeps_the_gradients():
    frozen = build_backbone("vit_tiny_test", None, seed=1)
    pixels = torch.randn(2, 3, 28, 28)
    grads, calls = [], []
    for checkpointing in (False, True):
        tuned = TunableBackbone.from_frozen(frozen, grad_checkpointing=checkpointing)
        count = [0]
        tuned.model.encoder.layer[0].register_forward_pre_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        tuned(pixels, (0, 2))[0].square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in tuned.named_parameters() if p.grad is not None})
        calls.append(count[0])
    assert calls == [1, 2]  # the checkpointed block runs again in the backward pass
    assert grads[0].keys() == grads[1].keys()
    assert len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_finetune_run_evaluates_online_under_cache_and_lin(ws, tuned_run, monkeypatch):
    result = evaluate(tuned_run, ws.labels["gt"], device="cpu")
    metrics = json.loads(RunFiles(tuned_run).metrics.read_text())
    assert 0 < result.miou <= 1
    assert metrics["miou"] == pytest.approx(result.miou)
    assert metrics["features"] == "online (fine-tuned backbone)"
    assert metrics["images"] == 8
    monkeypatch.setitem(PROTOCOLS, "lin", SMALL)
    [lin] = evaluate_runs([tuned_run], ws.labels["gt"], protocol="lin", workspace=ws, device="cpu", workers=0)
    assert 0 < lin.result.miou <= 1
    assert json.loads(RunFiles(tuned_run).metrics_for("lin").read_text())["miou"] == pytest.approx(lin.result.miou)


def test_cache_protocol_of_an_untuned_run_equals_the_cached_features(ws, zero_run):
    """With backbone lr 0 the online canvas gives the cached tokens (up to float16): the same scores."""
    online = evaluate(zero_run, ws.labels["gt"], device="cpu")
    head, _ = load_run(zero_run)
    cached = score_head(head, FeatureStore.open(store_path(TINY, ws.layout, "val")), ws.labels["gt"], device="cpu")
    assert online.miou == pytest.approx(cached.miou, abs=1e-3)
    assert online.confusion.sum() == cached.confusion.sum()


def test_weights_other_than_the_tuned_ones_are_refused(ws, tuned_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tuned_run, run)
    state = load_file(str(RunFiles(run).backbone))
    state["blocks.0.norm1.weight"] = state["blocks.0.norm1.weight"] + 1
    save_file(state, str(RunFiles(run).backbone))
    with pytest.raises(StoreMismatchError, match="SHA-256"):
        evaluate(run, ws.labels["gt"], device="cpu")


def test_predict_from_the_cache_refuses_a_finetune_run(ws, tuned_run, tmp_path):
    with pytest.raises(ConfigError, match="--protocol lin"):
        predict(tuned_run, tmp_path / "preds", store_path=store_path(TINY, ws.layout, "val"), protocol="cache")


@pytest.mark.parametrize(
    "bad", [{"backbone_lr": -1e-5}, {"layer_decay": 0.0}, {"layer_decay": 1.5}, {"workers": -1}]
)  # fmt: skip
def test_finetune_config_names_bad_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        FinetuneConfig(**bad)


def test_cli_finetune_runs_end_to_end(ws, tmp_path):
    out = tmp_path / "cli-run"
    args = ["finetune", "--labels", "gt", "--iterations", "3", "--batch-size", "4", "--backbone-lr", "1e-4",
            "--layer-decay", "0.8", "--workers", "0", "--device", "cpu", "--features", "vit_tiny_test-56-last-random",
            "--out", str(out), "--config", str(ws.file)]  # fmt: skip
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output
    files = RunFiles(out)
    config = json.loads(files.config.read_text())
    assert config["result"]["steps"] == 3
    assert config["finetune"]["layer_decay"] == 0.8
    assert config["store"]["extract_config"]["model"] == "vit_tiny_test"
    for path in (files.backbone, files.head, files.metrics, files.metrics_csv, files.curve):
        assert path.is_file(), path
    assert len(files.metrics_csv.read_text().splitlines()) == 4  # header + 3 steps
