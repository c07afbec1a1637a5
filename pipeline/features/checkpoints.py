"""Backbone weight files: where they are found, how they are read safely, how their keys map.

Two key layouts exist per family. The official one (``dinov2_vits14_pretrain.pth``,
``dino_deitsmall16_pretrain.pth``, iBOT's ``checkpoint_teacher.pth``, DINOv3's ``.pth``:
``blocks.i.attn.qkv`` ...) and the Hugging Face one, whose names changed between transformers versions
(5.x in memory: ``encoder.layer.i.attention.q_proj``; 4.x, and files that 5.x writes:
``attention.attention.query``). A :class:`KeyLayout` lists, per official tensor, the Hugging Face names
it may have; everything converts through the official layout, which never changes::

    state = read_state_dict(Path("dinov2_vits14_pretrain.pth"))      # either layout
    official = state if is_official_layout(state) else hf_to_official(state, DINOV2)
    model.load_state_dict(official_to_hf(official, model.state_dict(), DINOV2), strict=True)

:mod:`pipeline.features.backbones` and the family modules are the only users; nothing here knows about
the registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import torch
from safetensors.torch import load_file

from pipeline.errors import WeightsError

logger = logging.getLogger(__name__)

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2"
_TRUE = {"1", "on", "yes", "true"}

# One entry per official tensor: the alternative Hugging Face names it may have, newest first. An
# alternative with several names holds the official tensor split into equal chunks along dim 0
# (fused qkv -> q, k, v; SwiGLU w12 -> gate, up); a None chunk has no Hugging Face tensor (DINOv3's
# masked key bias) and reads back as zeros. Which alternative applies is detected from the keys
# actually present, so no single transformers version is hard-coded.
_Alternatives = tuple[tuple[str | None, ...], ...]


@dataclass(frozen=True)
class KeyLayout:
    """How one family's official keys map to Hugging Face names.

    ``blocks`` rules are suffixes under each of ``block_prefixes`` (``"encoder.layer.{i}."``; several
    when transformers versions differ); ``hf_ignored`` are Hugging Face key prefixes that hold no
    backbone weights (a pooler), dropped when reading.
    """

    globals: Mapping[str, _Alternatives]
    blocks: Mapping[str, _Alternatives]
    block_prefixes: tuple[str, ...]
    hf_ignored: tuple[str, ...] = ()

    def rules(self, depth: int) -> Iterator[tuple[str, _Alternatives]]:
        """(official key, alternative HF key groups) for a model with ``depth`` blocks."""
        yield from self.globals.items()
        for i in range(depth):
            prefixes = [p.format(i=i) for p in self.block_prefixes]
            for suffix, alternatives in self.blocks.items():
                groups = [tuple(None if k is None else p + k for k in alt) for p in prefixes for alt in alternatives]
                yield f"blocks.{i}.{suffix}", tuple(groups)

    def hf_depth(self, keys: Iterable[str]) -> int:
        """Number of blocks in a Hugging Face state dict with these keys."""
        heads = "|".join(re.escape(p.split("{i}")[0]) for p in self.block_prefixes)
        return _depth(keys, rf"^(?:{heads})(\d+)\.")


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


#: DINOv2 (``Dinov2Model`` / ``Dinov2WithRegistersModel``).
DINOV2 = KeyLayout(_GLOBAL_RULES, _block_rules(), ("encoder.layer.{i}.",))


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


def _present(alt: tuple[str | None, ...], keys: Mapping[str, torch.Tensor]) -> bool:
    return all(k in keys for k in alt if k is not None)


def official_to_hf(
    official: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], layout: KeyLayout = DINOV2
) -> dict[str, torch.Tensor]:
    """Official state dict -> the key names and shapes of ``target`` (the installed model's state dict).

    Raises :class:`WeightsError` naming missing, unexpected or mis-shaped keys.
    """
    official = unchunk_official(official)
    rules = dict(layout.rules(_depth(official, r"^blocks\.(\d+)\.")))
    out: dict[str, torch.Tensor] = {}
    unexpected, bad_shapes = [], []
    for key, value in official.items():
        alt = next((a for a in rules.get(key, ()) if _present(a, target)), None)
        if alt is None:
            unexpected.append(key)
            continue
        parts = value.chunk(len(alt), dim=0) if len(alt) > 1 else (value,)
        for name, part in zip(alt, parts, strict=True):
            if name is None:
                continue  # no such tensor in the HF model; the family checks that dropping it is exact
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


def hf_to_official(state: Mapping[str, torch.Tensor], layout: KeyLayout = DINOV2) -> dict[str, torch.Tensor]:
    """Hugging Face state dict (any transformers version's names) -> the family's official layout."""
    state = {k: v for k, v in state.items() if not k.startswith(layout.hf_ignored)}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, alternatives in layout.rules(layout.hf_depth(state)):
        alt = next((a for a in alternatives if any(a) and _present(a, state)), None)
        if alt is None:
            continue  # absent tensors (no registers, say) surface as missing keys when loading
        like = next(state[k] for k in alt if k is not None)
        parts = [torch.zeros_like(like) if k is None else state[k] for k in alt]
        value = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        out[key] = value.reshape(1, -1) if key == "mask_token" else value
        used.update(k for k in alt if k is not None)
    _check_keys([], sorted(set(state) - used), "Hugging Face weights")
    return out


#: Where training checkpoints keep a backbone's state dict, in the order tried: DINO / iBOT / DINOv2
#: training checkpoints hold ``teacher`` and ``student``, iBOT's backbone downloads ``state_dict``.
CHECKPOINT_KEYS = ("teacher", "state_dict", "model", "student")
#: Key prefixes added by training wrappers (DistributedDataParallel, the multi-crop wrapper), stripped.
WRAPPER_PREFIXES = ("module.", "backbone.")
#: Projection heads trained with the backbone (DINO, iBOT, DINOv2); not part of it, dropped.
HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.")


def _is_state_dict(obj: object) -> TypeGuard[dict[str, torch.Tensor]]:
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_checkpoint(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors in a loaded ``.pth``: a plain state dict, or the first of
    :data:`CHECKPOINT_KEYS` in a training checkpoint, with wrapper prefixes stripped and heads dropped."""
    if isinstance(obj, dict) and not _is_state_dict(obj):
        key = next((k for k in CHECKPOINT_KEYS if _is_state_dict(obj.get(k))), None)
        if key is None:
            raise WeightsError(
                f"{path} holds a checkpoint with keys {_few([str(k) for k in obj])}; expected a state dict of "
                f"tensors, or one under {' / '.join(CHECKPOINT_KEYS)}"
            )
        logger.info("reading the %r state dict of %s", key, path)
        obj = obj[key]
    if not _is_state_dict(obj):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, expected a plain state dict of tensors")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if not key.startswith(HEAD_PREFIXES):
            state[key] = value
    if dropped := len(obj) - len(state):
        logger.info("dropped %d projection-head tensors of %s", dropped, path)
    return state


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a checkpoint is data; never run code from a user's file
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"cannot read {path} as a plain tensor state dict (weights_only=True): {exc}. A full training "
            "checkpoint (with optimiser state and arguments) cannot be read: use its backbone-only file"
        ) from exc
    return unwrap_checkpoint(obj, path)


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
    """Tensors of a ``.pth``/``.pt``/``.bin`` state dict (or training checkpoint, see
    :func:`unwrap_checkpoint`), a ``.safetensors`` file or an HF model directory."""
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
