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
DINOV2_NAMES = [name for name in list_backbones() if get_spec(name).family == "dinov2"]


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


@pytest.mark.parametrize("name", DINOV2_NAMES)
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
    assert set(hub) | {"vit_tiny_test", "vit_tiny_test_reg"} == set(DINOV2_NAMES)
    assert list_backbones() == list(BACKBONES)
    assert all(BACKBONES[name] == get_spec(name) for name in hub)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError, match="dinov2_vitl14_reg"):
        build_backbone("dinov2_vitx14")


@pytest.mark.parametrize(
    "overrides",
    [{"patch_size": 0}, {"hidden_size": 50}, {"num_hidden_layers": 0}, {"image_size": 500}, {"hidden_size": "a"}],
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


# === other families: DINO, iBOT, DINOv3 ======================================================================
#
# Each family is checked against its own transcription of the official forward, on an official-layout
# state dict: facebookresearch/dino vision_transformer.py (iBOT's models/vision_transformer.py is the
# same code, its layer scale off), and facebookresearch/dinov3 dinov3/models/vision_transformer.py with
# dinov3/layers (attention.py, block.py, ffn_layers.py, rope_position_encoding.py).


def ref_dino_interpolate_pos_encoding(pos_embed, x, w, h, patch_size):
    """VisionTransformer.interpolate_pos_encoding of DINO (w is the row count: ``B, nc, w, h = x.shape``)."""
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2]
    assert int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def ref_dino_block(sd, p, x, heads):
    """Block.forward of DINO: pre-norm attention and MLP, no layer scale; LayerNorm eps 1e-6."""
    B, N, C = x.shape

    def norm(y, which):
        return F.layer_norm(y, (C,), sd[p + which + ".weight"], sd[p + which + ".bias"], eps=1e-6)

    qkv = F.linear(norm(x, "norm1"), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
    qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    y = F.linear((attn @ v).transpose(1, 2).reshape(B, N, C), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    x = x + y
    y = F.gelu(F.linear(norm(x, "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
    return x + F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])


def ref_dino_get_intermediate_layers(sd, x, n, heads, patch_size):
    """prepare_tokens, then the final norm of each of the last ``n`` blocks (a list, block order)."""
    B, _, w, h = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch_size)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), dim=1)
    t = t + ref_dino_interpolate_pos_encoding(sd["pos_embed"], t, w, h, patch_size)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    output = []
    for i in range(depth):
        t = ref_dino_block(sd, f"blocks.{i}.", t, heads)
        if depth - i <= n:
            output.append(F.layer_norm(t, t.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6))
    return output


def ref_dinov3_rope(periods, H, W):
    """RopePositionEmbedding.forward, normalize_coords="separate", in eval mode (no shift, jitter, rescale)."""
    coords_h = torch.arange(0.5, H, dtype=torch.float32) / H
    coords_w = torch.arange(0.5, W, dtype=torch.float32) / W
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return torch.sin(angles), torch.cos(angles)


def ref_rope_apply(x, sin, cos):
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos) + (torch.cat([-x2, x1], dim=-1) * sin)


def ref_dinov3_block(sd, p, x, heads, rope):
    """SelfAttentionBlock in eval: LinearKMaskedBias qkv, RoPE on patch tokens only, layer scale; eps 1e-5."""
    B, N, C = x.shape

    def norm(y, which):
        return F.layer_norm(y, (C,), sd[p + which + ".weight"], sd[p + which + ".bias"], eps=1e-5)

    bias = sd.get(p + "attn.qkv.bias")
    if bias is not None and p + "attn.qkv.bias_mask" in sd:
        bias = bias * sd[p + "attn.qkv.bias_mask"]
    qkv = F.linear(norm(x, "norm1"), sd[p + "attn.qkv.weight"], bias).reshape(B, N, 3, heads, C // heads)
    q, k, v = [t.transpose(1, 2) for t in torch.unbind(qkv, 2)]
    sin, cos = rope
    prefix = N - sin.shape[-2]
    q = torch.cat((q[:, :, :prefix], ref_rope_apply(q[:, :, prefix:], sin, cos)), dim=-2)
    k = torch.cat((k[:, :, :prefix], ref_rope_apply(k[:, :, prefix:], sin, cos)), dim=-2)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
    x = x + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]) * sd[p + "ls1.gamma"]
    y = norm(x, "norm2")
    if p + "mlp.w1.weight" in sd:  # SwiGLUFFN
        x1 = F.linear(y, sd[p + "mlp.w1.weight"], sd[p + "mlp.w1.bias"])
        x2 = F.linear(y, sd[p + "mlp.w2.weight"], sd[p + "mlp.w2.bias"])
        y = F.linear(F.silu(x1) * x2, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
    else:
        y = F.linear(
            F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
    return x + y * sd[p + "ls2.gamma"]


def ref_dinov3_get_intermediate_layers(sd, x, n, heads, patch_size=16):
    """get_intermediate_layers(x, n=list, return_class_token=True, norm=True) -> [(patches, cls)]."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch_size)
    B, _, H, W = t.shape
    t = t.flatten(2).transpose(1, 2)
    cls_token = sd["cls_token"] + 0 * sd["mask_token"]
    storage = sd["storage_tokens"]
    t = torch.cat([cls_token.expand(B, -1, -1), storage.expand(B, -1, -1), t], dim=1)
    rope = ref_dinov3_rope(sd["rope_embed.periods"], H, W)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    outputs = []
    for i in range(depth):
        t = ref_dinov3_block(sd, f"blocks.{i}.", t, heads, rope)
        if i in n:
            outputs.append(t)
    outputs = [F.layer_norm(o, o.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-5) for o in outputs]
    return [(o[:, storage.shape[1] + 1 :], o[:, 0]) for o in outputs]


def perturbed_any(name: str, overrides: dict | None = None, seed: int = 0) -> Backbone:
    """As :func:`perturbed`, for any family (DINOv3 has no position table)."""
    backbone = build_backbone(name, overrides=overrides, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for pname, p in backbone.model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (1.0 if "position_embeddings" in pname else 0.05))
    return backbone


FAMILY_CASES = {
    "dino16": ("dino_tiny_test", {}),
    "dino8": ("dino_tiny_test", {"patch_size": 8}),
    "ibot": ("ibot_vits16", {**SMALL, "num_hidden_layers": 3}),
    "dinov3": ("dinov3_tiny_test", {}),
    "dinov3_swiglu": ("dinov3_tiny_test", {"use_gated_mlp": True}),
}


def family_official_file(name: str, official: dict, path: Path) -> dict:
    """Write what the official downloads hold and return its state dict: DINO a plain state dict, iBOT
    ``{"state_dict": ...}`` (its backbone file), DINOv3 a plain state dict whose masked key bias holds
    arbitrary values (``bias_mask`` zeroes them)."""
    family = get_spec(name).family
    state = dict(official)
    for key in [k for k in official if family == "dinov3" and k.endswith("attn.qkv.bias")]:
        q, k, v = official[key].chunk(3)
        state[key] = torch.cat([q, torch.randn(k.shape), v])
    torch.save({"state_dict": state} if family == "ibot" else state, path)
    return state


@pytest.fixture(scope="module", params=list(FAMILY_CASES))
def family_exported(request, tmp_path_factory):
    """(name, overrides, official state dict, the file's state dict, .pth path, backbone loaded from it)."""
    name, overrides = FAMILY_CASES[request.param]
    official = to_official_state_dict(perturbed_any(name, overrides))
    path = tmp_path_factory.mktemp("weights") / get_spec(name).checkpoint
    in_file = family_official_file(name, official, path)
    return name, overrides, official, in_file, path, build_backbone(name, weights=path, overrides=overrides)


def family_reference(backbone, official, x, layers):
    """{block: (patches, cls)} from the family's transcribed official forward."""
    heads, patch = backbone.spec.heads, backbone.patch_size
    if backbone.spec.family == "dinov3":
        outs = ref_dinov3_get_intermediate_layers(official, x, sorted(layers), heads, patch)
        return dict(zip(sorted(layers), outs, strict=True))
    outs = ref_dino_get_intermediate_layers(official, x, backbone.depth, heads, patch)
    return {i: (outs[i][:, 1:], outs[i][:, 0]) for i in layers}


def test_family_official_file_round_trips(family_exported):
    name, _, official, _, path, loaded = family_exported
    assert_same_state(to_official_state_dict(loaded), official)
    assert loaded.weights_source == str(path)
    family = get_spec(name).family
    keys = {"cls_token", "patch_embed.proj.weight", "norm.bias", "blocks.2.attn.qkv.weight", "blocks.2.attn.proj.bias"}
    if family == "dinov3":
        keys |= {"storage_tokens", "mask_token", "rope_embed.periods", "blocks.2.attn.qkv.bias_mask", "blocks.2.ls2.gamma"}
        assert not any(k.startswith(("pos_embed", "register_tokens")) for k in official)
        assert official["storage_tokens"].shape == (1, 4, 48)
    else:
        keys |= {"pos_embed", "blocks.1.mlp.fc2.weight"}
        assert not any(k.startswith(("mask_token", "register_tokens")) or "ls1" in k for k in official)
    assert keys <= set(official)


@pytest.mark.parametrize(
    ("batch", "size", "layers"),
    [
        (2, None, (2,)),  # the stored grid (DINO, iBOT: the position table as is)
        (2, (32, 48), (2, 0)),
        (2, (48, 32), (0, 1, 2)),
        (1, (64, 64), (1, 2)),
        (1, (16, 16), (2,)),
    ],
)
def test_family_features_equal_official_reference(family_exported, batch, size, layers):
    """DINO / iBOT: interpolated position embeddings off the stored grid, non-square too; DINOv3: RoPE."""
    _, _, _, in_file, _, loaded = family_exported
    size = size or (loaded.spec.image_size,) * 2
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    patches, cls = loaded(x, layers)
    ref = family_reference(loaded, in_file, x, layers)
    h, w = size[0] // loaded.patch_size, size[1] // loaded.patch_size
    assert patches.shape == (batch, h, w, 48 * len(layers))
    expected_patches = torch.cat([ref[i][0] for i in layers], dim=-1).reshape(batch, h, w, -1)
    torch.testing.assert_close(patches, expected_patches, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, torch.cat([ref[i][1] for i in layers], dim=-1), atol=1e-5, rtol=1e-5)


def test_family_hf_directory_round_trip(family_exported, tmp_path):
    name, overrides, official, _, _, loaded = family_exported
    loaded.model.save_pretrained(tmp_path / "hf")  # transformers 5 writes the hub's (4.x) key names
    again = build_backbone(name, weights=tmp_path / "hf", overrides=overrides)
    assert_same_state(to_official_state_dict(again), official)
    assert again.fingerprint == loaded.fingerprint
    x = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(again(x, (0, 2))[0], loaded(x, (0, 2))[0], atol=0, rtol=0)


def test_dino_hf_directory_with_a_pooler_loads(tmp_path):
    """A saved ``ViTModel`` may carry a pooler (not part of the backbone); it is ignored."""
    from transformers import ViTModel

    ours = perturbed_any("dino_tiny_test")
    with_pooler = ViTModel(ours.model.config)  # add_pooling_layer=True
    assert with_pooler.load_state_dict(ours.model.state_dict(), strict=False).missing_keys == [
        "pooler.dense.weight",
        "pooler.dense.bias",
    ]
    with_pooler.save_pretrained(tmp_path / "hf")
    again = build_backbone("dino_tiny_test", weights=tmp_path / "hf")
    assert again.fingerprint == ours.fingerprint


def test_dino_transformers_own_interpolation_differs():
    """transformers' ViTModel interpolates to the exact grid; the official DINO code by a scale factor."""
    from transformers import ViTModel

    ours = perturbed_any("dino_tiny_test")
    plain = ViTModel(ours.model.config, add_pooling_layer=False).eval()
    plain.load_state_dict(ours.model.state_dict())
    for size, close in (((32, 48), False), ((64, 64), True)):
        x = torch.randn(1, 3, *size)
        mine = ours(x, "last")[0].flatten(1, 2)
        theirs = plain(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        relative = ((mine - theirs).norm() / theirs.norm()).item()
        assert (relative < 1e-5) if close else (relative > 1e-2), (size, relative)


def test_ibot_training_checkpoints(tmp_path):
    """Full checkpoints: the teacher is read, wrapper prefixes stripped, projection heads and the
    student's masked-patch token dropped; anything else is a clear error."""
    teacher, student = perturbed_any("ibot_vits16", SMALL), perturbed_any("ibot_vits16", SMALL, seed=1)

    def wrapped(backbone, prefix):
        state = {prefix + k: v for k, v in to_official_state_dict(backbone).items()}
        return state | {prefix.replace("backbone.", "head.") + "mlp.0.weight": torch.zeros(8, 48)}

    full = {"student": wrapped(student, "module.backbone.") | {"module.backbone.masked_embed": torch.zeros(1, 48)}}
    full |= {"teacher": wrapped(teacher, "backbone."), "epoch": 100}
    torch.save(full, tmp_path / "checkpoint.pth")
    assert build_backbone("ibot_vits16", weights=tmp_path / "checkpoint.pth", overrides=SMALL).fingerprint == teacher.fingerprint

    torch.save({"state_dict": full["student"]}, tmp_path / "checkpoint_student.pth")
    loaded = build_backbone("ibot_vits16", weights=tmp_path / "checkpoint_student.pth", overrides=SMALL)
    assert loaded.fingerprint == student.fingerprint

    torch.save({"weights": full["teacher"]}, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match="teacher / state_dict"):
        build_backbone("ibot_vits16", weights=tmp_path / "odd.pth", overrides=SMALL)
    torch.save({"stem.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="neither official"):
        build_backbone("ibot_vits16", weights=tmp_path / "other.pth", overrides=SMALL)


def test_dinov3_official_file_details(tmp_path):
    official = to_official_state_dict(perturbed_any("dinov3_tiny_test"))
    head_dim = 16
    expected = 100 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    torch.testing.assert_close(official["rope_embed.periods"], expected, atol=0, rtol=0)
    assert official["blocks.0.attn.qkv.bias_mask"].tolist() == [1.0] * 48 + [0.0] * 48 + [1.0] * 48
    assert official["mask_token"].shape == (1, 48)

    untied = official | {"local_cls_norm.weight": torch.ones(48), "local_cls_norm.bias": torch.zeros(48)}
    torch.save(untied, tmp_path / "7b_style.pth")  # a norm of local training crops (7B): dropped
    assert_same_state(to_official_state_dict(build_backbone("dinov3_tiny_test", weights=tmp_path / "7b_style.pth")), official)

    unmasked = {k: v for k, v in official.items() if not k.endswith("bias_mask")}
    unmasked["blocks.1.attn.qkv.bias"] = torch.ones(3 * 48)
    torch.save(unmasked, tmp_path / "unmasked.pth")
    with pytest.raises(WeightsError, match="key part"):
        build_backbone("dinov3_tiny_test", weights=tmp_path / "unmasked.pth")
    torch.save(official | {"rope_embed.periods": expected * 2}, tmp_path / "periods.pth")
    with pytest.raises(WeightsError, match="periods"):
        build_backbone("dinov3_tiny_test", weights=tmp_path / "periods.pth")


def test_patch_size_override_sets_the_patch():
    """``{"patch_size": 16}`` on a DINOv2 config: the spec (and so Backbone.patch_size) follows, the
    position grid stays (37 x 37: image_size 592), features still equal the official forward."""
    backbone = perturbed("vit_tiny_test", {"patch_size": 16})
    assert (backbone.patch_size, backbone.spec.patch, backbone.spec.image_size) == (16, 16, 592)
    official = to_official_state_dict(backbone)
    assert official["patch_embed.proj.weight"].shape == (48, 3, 16, 16)
    x = torch.randn(2, 3, 32, 48)
    patches, _ = backbone(x, (1, 2))
    ref = ref_intermediate_layers(official, x, (1, 2), 3, 0.1, False, patch_size=16)
    torch.testing.assert_close(patches, torch.cat([ref[1][0], ref[2][0]], dim=-1).reshape(2, 2, 3, -1), atol=1e-5, rtol=1e-5)
    dino8 = build_backbone("dino_vits16", overrides={**SMALL, "patch_size": 8})
    assert (dino8.patch_size, dino8.spec.image_size, dino8(torch.randn(1, 3, 32, 48), "last")[0].shape) == (8, 112, (1, 4, 6, 48))
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        build_backbone("dinov3_tiny_test", overrides={"patch_size": 16, "image_size": 40})


# Independent copy of the published tables: facebookresearch/dino hubconf.py, bytedance/ibot README,
# facebookresearch/dinov3 dinov3/hub/backbones.py and the Hugging Face model ids in its README.
DINO_HUB = {
    "dino_vits16": (384, 12, 6, 16, "dino_deitsmall16_pretrain.pth"),
    "dino_vits8": (384, 12, 6, 8, "dino_deitsmall8_pretrain.pth"),
    "dino_vitb16": (768, 12, 12, 16, "dino_vitbase16_pretrain.pth"),
    "dino_vitb8": (768, 12, 12, 8, "dino_vitbase8_pretrain.pth"),
}
IBOT_HUB = {
    "ibot_vits16": (384, 12, 6, "vits_16/checkpoint_teacher.pth"),
    "ibot_vitb16": (768, 12, 12, "vitb_16/checkpoint_teacher.pth"),
    "ibot_vitl16": (1024, 24, 16, "vitl_16/checkpoint_teacher.pth"),
    "ibot_vitl16_in22k": (1024, 24, 16, "vitl_16_pt22k/checkpoint_student.pth"),
}
DINOV3_HUB = {
    "vits16": (384, 12, 6, "mlp", 1536, "08c60483"),
    "vits16plus": (384, 12, 6, "swiglu", 1536, "4057cbaa"),
    "vitb16": (768, 12, 12, "mlp", 3072, "73cec8be"),
    "vitl16": (1024, 24, 16, "mlp", 4096, "8aa4cbdd"),
    "vith16plus": (1280, 32, 20, "swiglu", 5120, "7c1da9a5"),
    "vit7b16": (4096, 40, 32, "swiglu", 8192, "a955f4ea"),
}


@pytest.mark.parametrize("name", list(DINO_HUB))
def test_dino_registry_metadata(name):
    dim, depth, heads, patch, checkpoint = DINO_HUB[name]
    spec = get_spec(name)
    assert (spec.family, spec.hidden_size, spec.depth, spec.heads, spec.patch, spec.registers) == (
        "dino",
        dim,
        depth,
        heads,
        patch,
        0,
    )
    assert (spec.checkpoint, spec.hf_id, spec.image_size) == (checkpoint, "facebook/dino-" + name[5:], 224)
    assert spec.url == f"https://dl.fbaipublicfiles.com/dino/{checkpoint[:-4]}/{checkpoint}"
    assert (spec.interpolate_offset, spec.interpolate_antialias, spec.licence) == (0.1, False, None)


@pytest.mark.parametrize("name", list(IBOT_HUB))
def test_ibot_registry_metadata(name):
    dim, depth, heads, remote = IBOT_HUB[name]
    spec = get_spec(name)
    assert (spec.family, spec.hidden_size, spec.depth, spec.heads, spec.patch, spec.registers) == (
        "ibot",
        dim,
        depth,
        heads,
        16,
        0,
    )
    assert spec.url == "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/" + remote
    assert spec.hf_id is None
    assert spec.checkpoint.startswith(name)


@pytest.mark.parametrize("arch", list(DINOV3_HUB))
def test_dinov3_registry_metadata(arch):
    dim, depth, heads, ffn, hidden, digest = DINOV3_HUB[arch]
    spec = get_spec(f"dinov3_{arch}")
    assert (spec.family, spec.hidden_size, spec.depth, spec.heads, spec.ffn, spec.patch, spec.registers) == (
        "dinov3", dim, depth, heads, ffn, 16, 4,
    )  # fmt: skip
    assert (spec.hf_id, spec.checkpoint) == (
        f"facebook/dinov3-{arch}-pretrain-lvd1689m",
        f"dinov3_{arch}_pretrain_lvd1689m-{digest}.pth",
    )
    assert spec.licence == "DINOv3 License"
    assert spec.qkv_bias == (arch != "vit7b16")
    config = build_backbone(
        "dinov3_" + arch, overrides={"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 1}
    ).model.config
    assert config.intermediate_size == hidden * 64 // dim  # the official FFN width rule, at 64 channels


@pytest.mark.parametrize("name", [n for n in list_backbones() if get_spec(n).family != "dinov2"])
def test_every_other_family_entry_builds_small(name):
    entry = get_spec(name)
    backbone = build_backbone(name, overrides=SMALL)
    assert (backbone.depth, backbone.hidden_size, backbone.spec.heads, backbone.patch_size) == (2, 48, 3, entry.patch)
    assert (backbone.spec.registers, backbone.spec.ffn, backbone.spec.family) == (entry.registers, entry.ffn, entry.family)
    p = entry.patch
    patches, cls = backbone(torch.randn(1, 3, 2 * p, 3 * p), (0, 1))
    assert (patches.shape, cls.shape) == ((1, 2, 3, 96), (1, 96))
    assert torch.isfinite(torch.cat([patches.flatten(), cls.flatten()])).all()
    assert not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("name", ["dino_vitb8", "ibot_vitl16_in22k", "dinov3_vitl16"])
def test_offline_error_names_the_file(isolated_caches, name):
    spec = get_spec(name)
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone(name, weights=PRETRAINED)
    message = str(info.value)
    assert str(isolated_caches / "torch" / "hub" / "checkpoints" / spec.checkpoint) in message
    assert spec.url in message
    assert "--weights" in message
    assert "\n" not in message
    assert ("DINOv3 License" in message) == (spec.family == "dinov3")


def test_dino_resolution_order_torch_hub_then_hf_cache(isolated_caches):
    from_hub, from_hf = build_backbone("dino_vits16", overrides=SMALL), build_backbone("dino_vits16", overrides=SMALL, seed=1)
    hub_file = isolated_caches / "torch" / "hub" / "checkpoints" / "dino_deitsmall16_pretrain.pth"
    hub_file.parent.mkdir(parents=True)
    torch.save(to_official_state_dict(from_hub), hub_file)
    snapshot = _hf_snapshot(isolated_caches, "facebook/dino-vits16", from_hf)
    assert build_backbone("dino_vits16", weights=PRETRAINED, overrides=SMALL).fingerprint == from_hub.fingerprint
    hub_file.unlink()
    second = build_backbone("dino_vits16", weights=PRETRAINED, overrides=SMALL)
    assert (Path(second.weights_source), second.fingerprint) == (snapshot, from_hf.fingerprint)


def test_hf_directory_of_another_family_is_refused(tmp_path):
    build_backbone("vit_tiny_test", overrides={"hidden_size": 48}).model.save_pretrained(tmp_path / "dinov2")
    with pytest.raises(WeightsError, match="dinov2 model, not dino_tiny_test"):
        build_backbone("dino_tiny_test", weights=tmp_path / "dinov2")


def test_models_listing():
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["models"], catch_exceptions=False)
    assert shown.exit_code == 0
    public = [n for n in list_backbones() if not get_spec(n).test_only]
    assert public == list_backbones(include_test=False)
    assert all(name in shown.output for name in public)
    assert "tiny_test" not in shown.output
    row = next(line for line in shown.output.splitlines() if " dinov3_vitl16 " in line).split()
    assert row[:6] == ["dinov3_vitl16", "16", "1024", "24", "16", "4"]
    assert row[6].startswith("facebook/dinov3-")  # the HF id, folded on a narrow terminal
    assert "DINOv3 License" in shown.output
    everything = runner.invoke(app, ["models", "--all"], catch_exceptions=False).output
    assert all(name in everything for name in ("vit_tiny_test_reg", "dino_tiny_test", "dinov3_tiny_test"))
