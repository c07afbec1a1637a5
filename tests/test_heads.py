"""Heads: every registry entry builds, runs on (B, h, w, C) tokens and round-trips through its config."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.heads import DEFAULT_HEAD, HEADS, HeadSpec, build_head, head_from_config

C, K = 24, 5
SMALL = {"linear": {}, "bn-linear": {}, "mlp": {"hidden": 16}, "conv": {"hidden": 8}}


def tokens(b: int = 3, h: int = 4, w: int = 6, c: int = C, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, w, c, generator=g).to(torch.float16)


def test_registry_entries() -> None:
    assert DEFAULT_HEAD in HEADS
    assert set(HEADS) == set(SMALL)
    for name, spec in HEADS.items():
        assert isinstance(spec, HeadSpec)
        assert spec.name == name
        assert spec.description


@pytest.mark.parametrize("name", list(HEADS))
def test_shape_no_nan_and_float16_input(name: str) -> None:
    torch.manual_seed(0)
    head = build_head(name, C, K, **SMALL[name])
    out = head(tokens())
    assert out.shape == (3, K, 4, 6)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(HEADS))
def test_every_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    head = build_head(name, C, K, **SMALL[name])
    logits = head(tokens())
    labels = torch.randint(0, K, (3, 4, 6))
    F.cross_entropy(logits, labels).backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list(HEADS))
def test_multi_layer_input(name: str) -> None:
    head = build_head(name, 3 * C, K, n_layers=3, **SMALL[name])
    assert head.config["n_layers"] == 3
    assert head(tokens(c=3 * C)).shape == (3, K, 4, 6)
    with pytest.raises(ConfigError, match="divisible"):
        build_head(name, 3 * C + 1, K, n_layers=3)


@pytest.mark.parametrize("name", list(HEADS))
def test_config_round_trip(name: str) -> None:
    torch.manual_seed(0)
    head = build_head(name, 2 * C, K, n_layers=2, **SMALL[name])
    head.train()
    head(tokens(c=2 * C))  # move BatchNorm running stats away from their init
    head.eval()
    config = json.loads(json.dumps(head.config))  # as stored in a checkpoint
    torch.manual_seed(1)
    rebuilt = head_from_config(config)
    assert type(rebuilt) is type(head)
    assert rebuilt.config == head.config
    rebuilt.load_state_dict(head.state_dict(), strict=True)
    rebuilt.eval()
    x = tokens(c=2 * C, seed=5)
    torch.testing.assert_close(rebuilt(x), head(x), rtol=0, atol=0)


def test_bn_linear_is_batchnorm_then_1x1_conv() -> None:
    """The default head computes BN over all channels, then one linear map per token."""
    torch.manual_seed(0)
    head = build_head("bn-linear", C, K).eval()
    bn, conv = (m for m in head.modules() if isinstance(m, nn.BatchNorm2d | nn.Conv2d))
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = tokens().float()
    normed = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expected = normed @ conv.weight[:, :, 0, 0].T + conv.bias  # (B, h, w, K)
    torch.testing.assert_close(head(x), expected.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_linear_head_is_per_token_linear_map() -> None:
    torch.manual_seed(0)
    head = build_head("linear", C, K)
    conv = head.body
    assert isinstance(conv, nn.Conv2d)
    x = tokens().float()
    expected = x @ conv.weight[:, :, 0, 0].T + conv.bias
    torch.testing.assert_close(head(x), expected.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_conv_head_uses_neighbouring_patches_and_mlp_does_not() -> None:
    torch.manual_seed(0)
    x = tokens().float()
    y = x.clone()
    y[:, 0, 0] += 1.0  # change one token
    for name, spreads in (("conv", True), ("mlp", False), ("bn-linear", False)):
        head = build_head(name, C, K, **SMALL[name]).eval()
        changed = (head(x) - head(y)).abs().amax(dim=1) > 0  # (B, h, w)
        assert changed[:, 0, 0].all()
        assert bool(changed[:, 1, 1].any()) is spreads, name


def test_defaults_and_overrides_recorded() -> None:
    assert build_head("mlp", C, K).config["hidden"] == 256
    assert build_head("conv", C, K, hidden=8).config == {
        "name": "conv", "in_channels": C, "num_classes": K, "n_layers": 1, "hidden": 8,
    }  # fmt: skip


def test_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown head 'nope'.*bn-linear"):
        build_head("nope", C, K)
    with pytest.raises(ConfigError, match="hidden"):
        build_head("linear", C, K, hidden=4)
    with pytest.raises(ConfigError, match="num_classes"):
        build_head("linear", C, 0)
    with pytest.raises(ConfigError, match="lacks name"):
        head_from_config({"in_channels": C, "num_classes": K})
    head = build_head("linear", C, K)
    with pytest.raises(ConfigError, match=r"\(B, h, w, 24\)"):
        head(torch.zeros(2, 4, 4, C + 1))


# --- registering a head ---------------------------------------------------------------------------

PLUGIN = """
from torch import nn
from pipeline.heads import SegHead, register_head

@register_head("tiny-mlp", "two 1x1 convs with a ReLU, registered by a plugin")
class TinyMLP(SegHead):
    def __init__(self, in_channels, num_classes, n_layers=1, hidden=8):
        super().__init__(in_channels, num_classes, n_layers)
        self.body = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, num_classes, 1))
"""


@pytest.fixture
def plugin_head():
    """Registers ``tiny-mlp`` for one test and removes it afterwards (the registry is process-wide)."""
    namespace: dict[str, object] = {}
    exec(PLUGIN, namespace)
    yield HEADS["tiny-mlp"]
    del HEADS["tiny-mlp"]


def test_one_registration_makes_a_head_buildable_and_configurable(plugin_head) -> None:
    from pipeline.config import TrainConfig

    assert plugin_head.description.startswith("two 1x1 convs")
    head = build_head("tiny-mlp", C, K, hidden=4)
    assert head.config == {"name": "tiny-mlp", "in_channels": C, "num_classes": K, "n_layers": 1, "hidden": 4}
    assert head(tokens()).shape == (3, K, 4, 6)
    assert TrainConfig(head="tiny-mlp").head == "tiny-mlp"  # the config check reads the registry
    rebuilt = head_from_config(json.loads(json.dumps(head.config)))
    rebuilt.load_state_dict(head.state_dict())
    with pytest.raises(ConfigError, match="registered already"):
        exec(PLUGIN, {})


def test_unknown_head_is_refused_by_the_config_naming_the_valid_ones() -> None:
    from pipeline.config import TrainConfig

    with pytest.raises(ConfigError, match=r"unknown head 'segformer'; valid heads: linear, bn-linear, mlp, conv"):
        TrainConfig(head="segformer")


def test_a_registered_head_appears_in_train_head_help(tmp_path) -> None:
    """In a fresh interpreter: a plugin registers a head before the CLI is built, and `ssvt train-head
    --help` lists it with its description; without the plugin it is absent."""
    import subprocess
    import sys

    show_help = "from pipeline.cli import app; app(['train-head', '--help'], prog_name='ssvt', standalone_mode=False)"
    env = {"COLUMNS": "400", "PATH": "/usr/bin:/bin", "TERM": "dumb"}
    with_plugin = subprocess.run([sys.executable, "-c", PLUGIN + "\n" + show_help], capture_output=True, text=True, env=env)
    assert with_plugin.returncode == 0, with_plugin.stderr
    plain = subprocess.run([sys.executable, "-c", show_help], capture_output=True, text=True, env=env)
    assert plain.returncode == 0, plain.stderr
    text = " ".join(with_plugin.stdout.replace("│", " ").split())  # rich wraps long help inside a box
    assert "tiny-mlp: two 1x1 convs with a ReLU, registered by a plugin" in text
    assert "bn-linear: BatchNorm + 1x1 conv" in text
    assert "tiny-mlp" not in plain.stdout
