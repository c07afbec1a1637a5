"""DINOv2 weight files: where they are found, how they are read safely, how their keys map.

Two key layouts exist. The official one (``dinov2_vits14_pretrain.pth``: ``blocks.i.attn.qkv`` ...)
and the Hugging Face one, whose names changed between transformers versions (5.x in memory:
``encoder.layer.i.attention.q_proj``; 4.x, and files that 5.x writes: ``attention.attention.query``).
Everything converts through the official layout, which never changes::

    state = read_state_dict(Path("dinov2_vits14_pretrain.pth"))      # either layout
    official = state if is_official_layout(state) else hf_to_official(state)
    model.load_state_dict(official_to_hf(official, model.state_dict()), strict=True)

:mod:`pipeline.features.backbones` is the only user; nothing here knows about the registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.errors import WeightsError

logger = logging.getLogger(__name__)

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2"
_TRUE = {"1", "on", "yes", "true"}

# One entry per official tensor: the alternative Hugging Face names it may have, newest first. An
# alternative with several names holds the official tensor split into equal chunks along dim 0
# (fused qkv -> q, k, v; SwiGLU w12 -> gate, up). Which alternative applies is detected from the keys
# actually present, so no single transformers version is hard-coded.
_Alternatives = tuple[tuple[str, ...], ...]

_GLOBAL_RULES: dict[str, _Alternatives] = {
    "cls_token": (("embeddings.cls_token",),),
    "pos_embed": (("embeddings.position_embeddings",),),
    "register_tokens": (("embeddings.register_tokens",),),
    "mask_token": (("embeddings.mask_token",),),
    "patch_embed.proj.weight": (("embeddings.patch_embeddings.projection.weight",),),
    "patch_embed.proj.bias": (("embeddings.patch_embeddings.projection.bias",),),
    "norm.weight": (("layernorm.weight",),),
    "norm.bias": (("layernorm.bias",),),
}


def _block_rules() -> dict[str, _Alternatives]:
    rules: dict[str, _Alternatives] = {"ls1.gamma": (("layer_scale1.lambda1",),), "ls2.gamma": (("layer_scale2.lambda1",),)}
    for p in ("weight", "bias"):
        rules[f"norm1.{p}"] = ((f"norm1.{p}",),)
        rules[f"norm2.{p}"] = ((f"norm2.{p}",),)
        rules[f"attn.qkv.{p}"] = (
            tuple(f"attention.{x}_proj.{p}" for x in "qkv"),
            tuple(f"attention.attention.{x}.{p}" for x in ("query", "key", "value")),
        )
        rules[f"attn.proj.{p}"] = ((f"attention.o_proj.{p}",), (f"attention.output.dense.{p}",))
        rules[f"mlp.fc1.{p}"] = ((f"mlp.fc1.{p}",),)
        rules[f"mlp.fc2.{p}"] = ((f"mlp.fc2.{p}",),)
        rules[f"mlp.w12.{p}"] = ((f"mlp.gate_proj.{p}", f"mlp.up_proj.{p}"), (f"mlp.weights_in.{p}",))
        rules[f"mlp.w3.{p}"] = ((f"mlp.down_proj.{p}",), (f"mlp.weights_out.{p}",))
    return rules


_BLOCK_RULES = _block_rules()


def _rules(depth: int) -> Iterator[tuple[str, _Alternatives]]:
    """(official key, alternative HF key groups) for a model with ``depth`` blocks."""
    yield from _GLOBAL_RULES.items()
    for i in range(depth):
        for suffix, alternatives in _BLOCK_RULES.items():
            yield f"blocks.{i}.{suffix}", tuple(tuple(f"encoder.layer.{i}.{k}" for k in alt) for alt in alternatives)


def _depth(keys: Iterable[str], pattern: str) -> int:
    indices = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(indices) + 1 if indices else 0


def _few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _check_keys(missing: list[str], unexpected: list[str], what: str) -> None:
    if missing or unexpected:
        parts = [f"missing {len(missing)} keys: {_few(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)} keys: {_few(unexpected)}"] if unexpected else []
        raise WeightsError(f"{what} do not fit the model: " + "; ".join(parts) + ". Is it the right backbone name?")


def is_official_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for official DINOv2 keys (``cls_token``, ``blocks.i.``), False for Hugging Face keys."""
    if "cls_token" in state or any(k.startswith("blocks.") for k in state):
        return True
    if any(k.startswith(("embeddings.", "encoder.")) for k in state):
        return False
    raise WeightsError(f"weights have neither official DINOv2 nor Hugging Face keys (first keys: {_few(list(state))})")


def unchunk_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the chunk index of FSDP-chunked checkpoints: ``blocks.<chunk>.<i>.x`` -> ``blocks.<i>.x``."""
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


def official_to_hf(official: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official state dict -> the key names and shapes of ``target`` (the installed model's state dict).

    Raises :class:`WeightsError` naming missing, unexpected or mis-shaped keys.
    """
    official = unchunk_official(official)
    rules = dict(_rules(_depth(official, r"^blocks\.(\d+)\.")))
    out: dict[str, torch.Tensor] = {}
    unexpected, bad_shapes = [], []
    for key, value in official.items():
        alt = next((a for a in rules.get(key, ()) if all(k in target for k in a)), None)
        if alt is None:
            unexpected.append(key)
            continue
        parts = value.chunk(len(alt), dim=0) if len(alt) > 1 else (value,)
        for name, part in zip(alt, parts, strict=True):
            shape = target[name].shape
            if name.endswith("mask_token") and part.numel() == shape.numel():
                part = part.reshape(shape)  # (1, C) in the official file; HF versions have differed
            if part.shape != shape:
                bad_shapes.append(f"{key} {tuple(part.shape)} vs {name} {tuple(shape)}")
            out[name] = part.clone() if len(alt) > 1 else part
    _check_keys(sorted(set(target) - set(out)), unexpected, "weights")
    if bad_shapes:
        raise WeightsError(f"weight shapes do not fit the model: {_few(bad_shapes)}. Is it the right backbone name?")
    return out


def hf_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face state dict (any transformers version's names) -> official DINOv2 layout."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, alternatives in _rules(_depth(state, r"^encoder\.layer\.(\d+)\.")):
        alt = next((a for a in alternatives if all(k in state for k in a)), None)
        if alt is None:
            continue  # absent tensors (no registers, say) surface as missing keys when loading
        value = torch.cat([state[k] for k in alt], dim=0) if len(alt) > 1 else state[alt[0]]
        out[key] = value.reshape(1, -1) if key == "mask_token" else value
        used.update(alt)
    _check_keys([], sorted(set(state) - used), "Hugging Face weights")
    return out


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a checkpoint is data; never run code from a user's file
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read {path} as a plain tensor state dict (weights_only=True): {exc}") from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, expected a plain state dict of tensors")
    return obj


def _read_hf_dir(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(path / shard).items()}
    if (path / "pytorch_model.bin").is_file():
        return _load_pickle(path / "pytorch_model.bin")
    raise WeightsError(f"{path} is a directory without model.safetensors (or pytorch_model.bin)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt``/``.bin`` state dict, a ``.safetensors`` file or an HF model directory."""
    if path.is_dir():
        return _read_hf_dir(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as exc:
            raise WeightsError(f"cannot read {path} as safetensors: {exc}") from exc
    return _load_pickle(path)


def read_hf_config(path: Path) -> dict[str, object]:
    """``config.json`` of an HF model directory (WeightsError if absent)."""
    file = path / "config.json"
    if not file.is_file():
        raise WeightsError(f"{path} is a directory without config.json; expected a Hugging Face model directory")
    return json.loads(file.read_text())


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 hex over keys in sorted order: each key's UTF-8 bytes, then its tensor's contiguous CPU bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(key.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- where weights live -------------------------------------------------------------------------


def official_url(checkpoint: str) -> str:
    """Download address of an official file: ``.../dinov2_vits14/dinov2_vits14_reg4_pretrain.pth``."""
    base = checkpoint.removesuffix("_pretrain.pth").removesuffix("_reg4")
    return f"{OFFICIAL_URL}/{base}/{checkpoint}"


def torch_hub_file(checkpoint: str) -> Path:
    """``$TORCH_HOME/hub/checkpoints/<checkpoint>``, where ``torch.hub`` keeps downloaded files."""
    return Path(torch.hub.get_dir()) / "checkpoints" / checkpoint


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache)
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))) / "hub"


def _has_model(path: Path) -> bool:
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (path / "config.json").is_file() and any((path / w).is_file() for w in weights)


def find_in_hf_cache(hf_id: str) -> Path | None:
    """The cached snapshot directory of ``hf_id`` if it holds a config and weights, without network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(hf_id, cache_dir=hf_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    return path if _has_model(path) else None


def download_hf(hf_id: str) -> Path:
    """Download ``hf_id``'s config and safetensors weights into the HF cache; raises when offline."""
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    logger.info("downloading %s from the Hugging Face hub", hf_id)
    return Path(snapshot_download(hf_id, cache_dir=hf_cache_dir(), allow_patterns=patterns))
