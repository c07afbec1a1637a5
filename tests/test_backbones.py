"""Backbone registry, weight loading and features, checked against an independent reference of the
official DINOv2 ViT forward (dinov2/models/vision_transformer.py and dinov2/layers, written out below
from the official code, operating on an official-layout state dict)."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Model, Dinov2WithRegistersModel

from pipeline.errors import ConfigError, WeightsError, WeightsNotFoundError
from pipeline.features.backbones import (
    BACKBONES,
    PRETRAINED,
    Backbone,
    build_backbone,
    get_spec,
    list_backbones,
    resolve_layers,
    resolve_weights,
    to_official_state_dict,
)

SMALL = {"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 3}


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch hub and HF caches, hub offline: no test sees the user's caches or the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


# --- reference: the official forward, transcribed ---------------------------------------------------


def ref_interpolate_pos_encoding(pos_embed, x, w, h, patch_size, offset, antialias):
    """DinoVisionTransformer.interpolate_pos_encoding; note w, h = x.shape[2], x.shape[3] there."""
    previous_dtype = x.dtype
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    M = int(math.sqrt(N))
    kwargs = {}
    if offset:
        kwargs["scale_factor"] = (float(w0 + offset) / M, float(h0 + offset) / M)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def ref_block(sd, p, x, heads):
    B, N, C = x.shape

    def attn(y):
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (C // heads) ** -0.5, qkv[1], qkv[2]
        y = ((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        return F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])

    def ffn(y):
        if p + "mlp.w12.weight" in sd:  # SwiGLUFFN
            x1, x2 = F.linear(y, sd[p + "mlp.w12.weight"], sd[p + "mlp.w12.bias"]).chunk(2, dim=-1)
            return F.linear(F.silu(x1) * x2, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        y = F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        return F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])

    def norm(y, which):
        return F.layer_norm(y, (C,), sd[p + which + ".weight"], sd[p + which + ".bias"], eps=1e-6)

    x = x + sd[p + "ls1.gamma"] * attn(norm(x, "norm1"))
    return x + sd[p + "ls2.gamma"] * ffn(norm(x, "norm2"))


def ref_intermediate_layers(sd, x, n, heads, offset, antialias, patch_size=14):
    """get_intermediate_layers(x, n, return_class_token=True, norm=True), as {block: (patches, cls)}."""
    B, _, w, h = x.shape  # official names: w is the row count
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch_size)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), dim=1)
    t = t + ref_interpolate_pos_encoding(sd["pos_embed"], t, w, h, patch_size, offset, antialias)
    registers = sd.get("register_tokens")
    if registers is not None:
        t = torch.cat((t[:, :1], registers.expand(B, -1, -1), t[:, 1:]), dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out = {}
    for i in range(depth):
        t = ref_block(sd, f"blocks.{i}.", t, heads)
        if i in n:
            normed = F.layer_norm(t, t.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)
            skip = 1 + (0 if registers is None else registers.shape[1])
            out[i] = (normed[:, skip:], normed[:, 0])
    return out


# --- fixtures ------------------------------------------------------------------------------------------


def perturbed(name: str, overrides: dict | None = None, seed: int = 0) -> Backbone:
    """A random backbone with every parameter (biases, layer scales, norms included) perturbed and
    large noise on the position embeddings, so that wrong key maps or interpolation show."""
    backbone = build_backbone(name, overrides=overrides, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        pos = backbone.model.embeddings.position_embeddings
        pos.add_(torch.randn(pos.shape, generator=gen))
    return backbone


CASES = [("vit_tiny_test", {}), ("vit_tiny_test_reg", {}), ("vit_tiny_test", {"use_swiglu_ffn": True})]


@pytest.fixture(scope="module", params=CASES, ids=["mlp", "registers", "swiglu"])
def exported(request, tmp_path_factory):
    """(name, overrides, official state dict, .pth path, backbone loaded from that file)."""
    name, overrides = request.param
    official = to_official_state_dict(perturbed(name, overrides))
    path = tmp_path_factory.mktemp("weights") / get_spec(name).checkpoint
    torch.save(official, path)
    return name, overrides, official, path, build_backbone(name, weights=path, overrides=overrides)


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


# --- official parity --------------------------------------------------------------------------------------


def test_official_file_round_trips_exactly(exported):
    name, _, official, path, loaded = exported
    assert_same_state(to_official_state_dict(loaded), official)
    assert loaded.weights_source == str(path)
    expected = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "norm.bias", "blocks.2.ls2.gamma"}
    assert expected <= set(official)
    assert ("register_tokens" in official) == bool(get_spec(name).registers)


@pytest.mark.parametrize(
    ("batch", "size", "layers"),
    [
        (2, (224, 224), (2,)),
        (2, (224, 224), (2, 0)),
        (2, (70, 98), (0, 1, 2)),
        (2, (98, 70), (1, 2)),
        (1, (518, 518), (2, 0)),
    ],
)
def test_features_equal_official_reference(exported, batch, size, layers):
    """Off 518 the position grid is interpolated (non-square too); at 518 (37 x 37) used as is."""
    name, _, official, _, loaded = exported
    spec = get_spec(name)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    patches, cls = loaded(x, layers)
    ref = ref_intermediate_layers(official, x, layers, spec.heads, spec.interpolate_offset, spec.interpolate_antialias)
    h, w = size[0] // 14, size[1] // 14
    expected_patches = torch.cat([ref[i][0] for i in layers], dim=-1).reshape(batch, h, w, -1)
    expected_cls = torch.cat([ref[i][1] for i in layers], dim=-1)
    assert patches.shape == (batch, h, w, 48 * len(layers))
    torch.testing.assert_close(patches, expected_patches, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, expected_cls, atol=1e-5, rtol=1e-5)


def test_transformers_own_interpolation_differs_off_518():
    """Without the patched interpolation the features would differ, so the parity test can catch it."""
    ours = perturbed("vit_tiny_test")
    plain = Dinov2Model(ours.model.config).eval()
    plain.load_state_dict(ours.model.state_dict())
    for size, close in (((224, 224), False), ((518, 518), True)):
        x = torch.randn(1, 3, *size)
        mine = ours(x, "last")[0].flatten(1, 2)
        theirs = plain(pixel_values=x).last_hidden_state[:, 1:]
        relative = ((mine - theirs).norm() / theirs.norm()).item()
        assert (relative < 1e-5) if close else (relative > 1e-2), (size, relative)


def test_hf_directory_round_trip(exported, tmp_path):
    name, overrides, official, _, loaded = exported
    loaded.model.save_pretrained(tmp_path / "hf")  # transformers 5 writes its legacy (4.x) key names
    again = build_backbone(name, weights=tmp_path / "hf", overrides=overrides)
    assert_same_state(to_official_state_dict(again), official)
    assert again.fingerprint == loaded.fingerprint
    x = torch.randn(1, 3, 56, 84)
    torch.testing.assert_close(again(x, (0, 2))[0], loaded(x, (0, 2))[0], atol=0, rtol=0)


def test_chunked_official_keys_load(exported, tmp_path):
    """FSDP-trained checkpoints name blocks ``blocks.<chunk>.<i>.``; the chunk index is dropped."""
    name, overrides, official, _, _ = exported
    chunked = {k.replace("blocks.", "blocks.0.", 1): v for k, v in official.items()}
    torch.save(chunked, tmp_path / "chunked.pth")
    again = build_backbone(name, weights=tmp_path / "chunked.pth", overrides=overrides)
    assert_same_state(to_official_state_dict(again), official)


# --- registry ----------------------------------------------------------------------------------------------

# Independent copy of the published table (the DINOv2 model card and the official hub configs).
HUB = {
    "s": ("small", 384, 12, 6, "mlp"),
    "b": ("base", 768, 12, 12, "mlp"),
    "l": ("large", 1024, 24, 16, "mlp"),
    "g": ("giant", 1536, 40, 24, "swiglu"),
}


@pytest.mark.parametrize("letter", list(HUB))
@pytest.mark.parametrize("reg", [False, True])
def test_registry_metadata(letter, reg):
    size, dim, depth, heads, ffn = HUB[letter]
    spec = get_spec(f"dinov2_vit{letter}14" + ("_reg" if reg else ""))
    hf = f"facebook/dinov2-with-registers-{size}" if reg else f"facebook/dinov2-{size}"
    assert (spec.hf_id, spec.hidden_size, spec.depth, spec.heads, spec.ffn) == (hf, dim, depth, heads, ffn)
    assert spec.registers == (4 if reg else 0)
    assert spec.checkpoint == f"dinov2_vit{letter}14{'_reg4' if reg else ''}_pretrain.pth"
    assert spec.url == f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{letter}14/{spec.checkpoint}"
    assert (spec.patch, spec.image_size) == (14, 518)
    assert (spec.mean, spec.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (spec.interpolate_offset, spec.interpolate_antialias) == ((0.0, True) if reg else (0.1, False))


@pytest.mark.parametrize("name", list_backbones())
def test_every_entry_builds_small(name):
    entry = get_spec(name)
    backbone = build_backbone(name, overrides=SMALL)
    assert (backbone.depth, backbone.hidden_size, backbone.spec.heads) == (2, 48, 3)
    assert (backbone.spec.registers, backbone.spec.ffn) == (entry.registers, entry.ffn)
    assert isinstance(backbone.model, Dinov2WithRegistersModel if entry.registers else Dinov2Model)
    assert hasattr(backbone.model.encoder.layer[0].mlp, "gate_proj" if entry.ffn == "swiglu" else "fc1")
    patches, cls = backbone(torch.randn(1, 3, 28, 42), (0, 1))
    assert (patches.shape, cls.shape) == ((1, 2, 3, 96), (1, 96))
    assert torch.isfinite(torch.cat([patches.flatten(), cls.flatten()])).all()
    assert backbone.weights_source == "random init (seed 0)"


def test_list_backbones_has_all_hub_names():
    hub = [f"dinov2_vit{x}14{r}" for x in "sblg" for r in ("", "_reg")]
    assert set(hub) | {"vit_tiny_test", "vit_tiny_test_reg"} == set(list_backbones()) == set(BACKBONES)
    assert all(BACKBONES[name] == get_spec(name) for name in hub)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError, match="dinov2_vitl14_reg"):
        build_backbone("dinov2_vitx14")


@pytest.mark.parametrize(
    "overrides",
    [{"patch_size": 16}, {"hidden_size": 50}, {"num_hidden_layers": 0}, {"image_size": 500}, {"hidden_size": "a"}],
)
def test_bad_overrides(overrides):
    with pytest.raises(ConfigError):
        build_backbone("vit_tiny_test", overrides=overrides)


def test_registers_cannot_be_overridden_away():
    with pytest.raises(ConfigError, match="registers"):
        build_backbone("vit_tiny_test_reg", overrides={"num_register_tokens": 0})


# --- the wrapper -------------------------------------------------------------------------------------------


def test_frozen_and_stays_in_eval():
    backbone = build_backbone("vit_tiny_test")
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert (backbone.training, backbone.model.training) == (False, False)
    assert (backbone.patch_size, backbone.mean, backbone.std) == (14, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize("shape", [(1, 3, 28, 30), (1, 3, 27, 28), (1, 1, 28, 28), (3, 28, 28)])
def test_bad_pixel_shapes(shape):
    with pytest.raises(ConfigError):
        build_backbone("vit_tiny_test")(torch.zeros(shape), "last")


def test_random_init_and_fingerprint():
    a, b, c = build_backbone("vit_tiny_test"), build_backbone("vit_tiny_test"), build_backbone("vit_tiny_test", seed=1)
    assert_same_state(a.model.state_dict(), b.model.state_dict())
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert c.weights_source == "random init (seed 1)"
    digest = hashlib.sha256()  # the documented recipe, over the official layout
    for key, tensor in sorted(to_official_state_dict(a).items()):
        digest.update(key.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    assert a.fingerprint == digest.hexdigest()
    a.double()  # other bytes, other fingerprint; the cache must not survive
    assert a.fingerprint != b.fingerprint


def test_device_move_keeps_the_cached_fingerprint(monkeypatch):
    """Moving to a device keeps the bytes, so the (for ViT-L, seconds long) hash is not redone."""
    import pipeline.features.checkpoints as checkpoints

    bb = build_backbone("vit_tiny_test")
    before = bb.fingerprint
    monkeypatch.setattr(checkpoints, "fingerprint", lambda *_: pytest.fail("fingerprint recomputed"))
    bb.to(torch.device("cpu"))
    assert bb.fingerprint == before


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("last", (11,)),
        ("last4", (8, 9, 10, 11)),
        ("LAST2", (10, 11)),
        ("8,9,10,11", (8, 9, 10, 11)),
        (" 3, 1 ", (3, 1)),
        ([-1, 0], (11, 0)),
        ([np.int64(-2)], (10,)),
        ((5,), (5,)),
    ],
)
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 12) == expected


@pytest.mark.parametrize("spec", ["12", [12], [-13], "", "foo", "last0", "last13", [1, 1], [], [True], "1.5"])
def test_resolve_layers_rejects(spec):
    with pytest.raises(ConfigError):
        resolve_layers(spec, 12)


# --- weights: files, caches, errors ----------------------------------------------------------------------


def test_nothing_found_says_where_to_put_the_file(isolated_caches):
    hub_file = isolated_caches / "torch" / "hub" / "checkpoints" / "dinov2_vitl14_reg4_pretrain.pth"
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone("dinov2_vitl14_reg", weights=PRETRAINED)
    message = str(info.value)
    assert str(hub_file) in message
    assert "--weights" in message
    assert "\n" not in message
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth" in message
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights("dinov2_vits14", isolated_caches / "nope.pth")


def _hf_snapshot(root: Path, hf_id: str, backbone: Backbone) -> Path:
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<rev>/}."""
    repo = root / "hf" / "hub" / ("models--" + hf_id.replace("/", "--"))
    backbone.model.save_pretrained(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return repo / "snapshots" / "abc123"


def test_resolution_order_torch_hub_then_hf_cache(isolated_caches):
    from_hub, from_hf = build_backbone("dinov2_vits14", overrides=SMALL), build_backbone("dinov2_vits14", overrides=SMALL, seed=1)
    hub_file = isolated_caches / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    hub_file.parent.mkdir(parents=True)
    torch.save(to_official_state_dict(from_hub), hub_file)
    snapshot = _hf_snapshot(isolated_caches, "facebook/dinov2-small", from_hf)

    first = build_backbone("dinov2_vits14", weights=PRETRAINED, overrides=SMALL)
    assert (first.weights_source, first.fingerprint) == (str(hub_file), from_hub.fingerprint)
    hub_file.unlink()
    second = build_backbone("dinov2_vits14", weights=PRETRAINED, overrides=SMALL)
    assert (Path(second.weights_source), second.fingerprint) == (snapshot, from_hf.fingerprint)
    shutil.rmtree(snapshot)
    with pytest.raises(WeightsNotFoundError):
        resolve_weights("dinov2_vits14")


def test_arbitrary_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"cls_token": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights_only"):
        build_backbone("vit_tiny_test", weights=tmp_path / "evil.pth")
    assert not marker.exists()


def test_strict_keys(exported, tmp_path):
    name, overrides, official, _, _ = exported
    broken = dict(official)
    del broken["blocks.1.ls1.gamma"]
    broken["blocks.0.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"blocks\.0\.extra\.weight") as info:
        build_backbone(name, weights=tmp_path / "broken.pth", overrides=overrides)
    assert "layer_scale1" in str(info.value)  # the missing tensor, named as the model calls it


def test_wrong_size_is_a_weights_error(exported):
    name, overrides, _, path, _ = exported
    with pytest.raises(WeightsError, match="shapes"):
        build_backbone(name, weights=path, overrides={**overrides, "hidden_size": 96})


def test_hf_config_must_match(tmp_path):
    build_backbone("vit_tiny_test").model.save_pretrained(tmp_path / "hf")
    with pytest.raises(WeightsError, match="num_attention_heads"):
        build_backbone("vit_tiny_test", weights=tmp_path / "hf", overrides={"num_attention_heads": 6})
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError):
        build_backbone("vit_tiny_test", weights=tmp_path / "empty")
