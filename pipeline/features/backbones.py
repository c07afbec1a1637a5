"""DINOv2 backbones: a registry, weight resolution and the frozen feature extractor.

The only module that knows DINOv2 internals (with :mod:`pipeline.features.checkpoints`, which maps weight
files). Features equal the official implementation's ``get_intermediate_layers(norm=True)`` at any
input size that is a multiple of 14, including its position-embedding interpolation::

    backbone = build_backbone("dinov2_vitl14", weights="pretrained")   # or a path, or None = random
    layers = resolve_layers("last4", backbone.depth)
    with torch.inference_mode():
        patches, cls = backbone(pixels, layers)   # (B, H/14, W/14, 4C), (B, 4C)
"""

from __future__ import annotations

import logging
import math
import operator
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PretrainedConfig,
)

from pipeline.cache.geometry import PATCH
from pipeline.errors import ConfigError, WeightsError, WeightsNotFoundError
from pipeline.features import checkpoints

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``weights=PRETRAINED`` looks in the torch hub cache, then the HF cache, then downloads.
PRETRAINED = "pretrained"


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: architecture, where its weights live, and how it interpolates positions.

    ``interpolate_offset`` / ``interpolate_antialias`` are the official hub settings: non-register
    models interpolate with scale factor ``(grid + 0.1) / 37`` and no antialias; register models to
    the exact grid size with antialias.
    """

    name: str
    hf_id: str | None
    hidden_size: int
    depth: int
    heads: int
    ffn: Literal["mlp", "swiglu"]
    registers: int
    checkpoint: str
    patch: int = PATCH
    image_size: int = 518
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    @property
    def url(self) -> str | None:
        """Official download address of :attr:`checkpoint` (None for test-only entries)."""
        return checkpoints.official_url(self.checkpoint) if self.hf_id else None


def _registry() -> dict[str, BackboneSpec]:
    archs = {  # hub letter: HF size word, dim, depth, heads, FFN
        "s": ("small", 384, 12, 6, "mlp"),
        "b": ("base", 768, 12, 12, "mlp"),
        "l": ("large", 1024, 24, 16, "mlp"),
        "g": ("giant", 1536, 40, 24, "swiglu"),
    }
    specs = []
    for letter, (size, dim, depth, heads, ffn) in archs.items():
        for reg in (False, True):
            name = f"dinov2_vit{letter}14" + ("_reg" if reg else "")
            specs.append(
                BackboneSpec(
                    name=name,
                    hf_id=f"facebook/dinov2-{'with-registers-' if reg else ''}{size}",
                    hidden_size=dim,
                    depth=depth,
                    heads=heads,
                    ffn=ffn,  # type: ignore[arg-type]
                    registers=4 if reg else 0,
                    checkpoint=f"dinov2_vit{letter}14{'_reg4' if reg else ''}_pretrain.pth",
                    interpolate_offset=0.0 if reg else 0.1,
                    interpolate_antialias=reg,
                )
            )
    for reg in (False, True):  # test-sized, never published: random init or a local file only
        name = "vit_tiny_test" + ("_reg" if reg else "")
        specs.append(
            BackboneSpec(
                name=name,
                hf_id=None,
                hidden_size=48,
                depth=3,
                heads=3,
                ffn="mlp",
                registers=4 if reg else 0,
                checkpoint=f"{name}_pretrain.pth",
                interpolate_offset=0.0 if reg else 0.1,
                interpolate_antialias=reg,
            )
        )
    return {spec.name: spec for spec in specs}


_REGISTRY = _registry()
#: Read-only view of the registry: name -> spec.
BACKBONES: Mapping[str, BackboneSpec] = types.MappingProxyType(_REGISTRY)

#: HF config fields that ``overrides`` may change (architecture only).
OVERRIDABLE = frozenset(
    {"hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "use_swiglu_ffn"}
    | {"num_register_tokens", "image_size", "layer_norm_eps"}
)


def list_backbones() -> list[str]:
    """Registered backbone names, in registry order."""
    return list(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The registry entry ``name``; ConfigError listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _configure(spec: BackboneSpec, overrides: Mapping[str, Any]) -> tuple[BackboneSpec, PretrainedConfig]:
    """The entry's HF config with ``overrides`` merged in, and the spec describing the result."""
    unknown = sorted(set(overrides) - OVERRIDABLE)
    if unknown:
        raise ConfigError(f"cannot override {', '.join(unknown)}; overridable: {', '.join(sorted(OVERRIDABLE))}")
    kwargs: dict[str, Any] = {
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.heads,
        "mlp_ratio": 4,
        "use_swiglu_ffn": spec.ffn == "swiglu",
        "image_size": spec.image_size,
        "patch_size": spec.patch,
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "hidden_act": "gelu",
        "qkv_bias": True,
    }
    if spec.registers:
        kwargs["num_register_tokens"] = spec.registers
    kwargs.update(overrides)
    integers = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_register_tokens", "image_size")
    wrong = [f"{k}={kwargs[k]!r}" for k in integers if k in kwargs and type(kwargs[k]) is not int]
    if wrong:
        raise ConfigError(f"overrides for {spec.name} must be integers: {', '.join(wrong)}")
    dim, heads, depth, size = (kwargs[k] for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "image_size"))
    registers = kwargs.get("num_register_tokens", 0)
    if (registers > 0) != (spec.registers > 0):
        raise ConfigError(f"{spec.name} has {spec.registers} registers; use the other entry (_reg or not)")
    if depth < 1 or heads < 1 or dim % heads or size % spec.patch:
        raise ConfigError(
            f"bad overrides for {spec.name}: need depth >= 1, hidden_size divisible by heads and image_size "
            f"a multiple of {spec.patch}; got depth={depth}, hidden_size={dim}, heads={heads}, image_size={size}"
        )
    config_cls = Dinov2WithRegistersConfig if registers else Dinov2Config
    try:
        config = config_cls(**kwargs)
    except Exception as exc:  # transformers' strict config validation has its own error types
        raise ConfigError(f"bad overrides for {spec.name}: {exc}") from exc
    ffn: Literal["mlp", "swiglu"] = "swiglu" if kwargs["use_swiglu_ffn"] else "mlp"
    spec = replace(spec, hidden_size=dim, depth=depth, heads=heads, ffn=ffn, registers=registers, image_size=size)
    return spec, config


def resolve_weights(name: str, weights: str | Path | None = None, *, allow_download: bool = True) -> Path:
    """Where ``name``'s weights are: a file or an HF model directory.

    ``weights`` is a path (an official ``*_pretrain.pth``, a state dict, or an HF directory with
    config.json + model.safetensors), or None / ``"pretrained"`` to search, in order: the torch hub
    cache (``$TORCH_HOME/hub/checkpoints/<official file>``), the Hugging Face cache, a download
    (skipped when ``HF_HUB_OFFLINE`` is set). Raises WeightsNotFoundError saying where to put the file.
    """
    spec = get_spec(name)
    if weights is not None and str(weights) != PRETRAINED:
        path = Path(weights).expanduser()
        if not path.exists():
            raise WeightsNotFoundError(f"--weights {path} does not exist")
        return path
    hub_file = checkpoints.torch_hub_file(spec.checkpoint)
    if hub_file.is_file():
        return hub_file
    hf_note = "it has no Hugging Face id"
    if spec.hf_id:
        cached = checkpoints.find_in_hf_cache(spec.hf_id)
        if cached is not None:
            return cached
        hf_note = f"{spec.hf_id} is not in the Hugging Face cache {checkpoints.hf_cache_dir()}"
        if not allow_download or checkpoints.hf_offline():
            hf_note += " and downloading is off"
        else:
            try:
                return checkpoints.download_hf(spec.hf_id)
            except Exception as exc:  # any network or hub failure means: not available here
                hf_note += f" and the download failed ({type(exc).__name__})"
    source = f" (from {spec.url})" if spec.url else ""
    raise WeightsNotFoundError(
        f"no weights found for {name}: place {spec.checkpoint}{source} at {hub_file}, or pass "
        f"--weights PATH (an official *_pretrain.pth or a Hugging Face model directory); {hf_note}"
    )


def _check_hf_config(path: Path, spec: BackboneSpec) -> None:
    """An HF directory's config.json must describe the same architecture (heads are not in the shapes)."""
    found = checkpoints.read_hf_config(path)
    expected = {
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.heads,
        "use_swiglu_ffn": spec.ffn == "swiglu",
        "num_register_tokens": spec.registers,
    }
    defaults = {"use_swiglu_ffn": False, "num_register_tokens": 0}
    wrong = [f"{k}={found.get(k, defaults.get(k))} (need {v})" for k, v in expected.items() if found.get(k, defaults.get(k)) != v]
    if wrong:
        raise WeightsError(f"{path}/config.json does not describe {spec.name}: {', '.join(wrong)}")


def _load_weights(model: nn.Module, path: Path, spec: BackboneSpec) -> None:
    """Load ``path`` into ``model`` (built on the meta device) with strict key matching."""
    state = checkpoints.read_state_dict(path)
    if path.is_dir():
        _check_hf_config(path, spec)
    official = state if checkpoints.is_official_layout(state) else checkpoints.hf_to_official(state)
    official = {k: v.float() if v.is_floating_point() else v for k, v in official.items()}
    converted = checkpoints.official_to_hf(official, model.state_dict())
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit {spec.name}: {exc}") from exc


def build_backbone(
    name: str,
    weights: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Backbone:
    """A frozen :class:`Backbone` for registry entry ``name``.

    weights: None = random init from ``seed`` (deterministic); ``"pretrained"`` or a path: see
    :func:`resolve_weights`. overrides: HF config fields (:data:`OVERRIDABLE`) merged over the entry,
    e.g. ``{"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 3}``.
    """
    spec, config = _configure(get_spec(name), overrides or {})
    model_cls: Any = Dinov2WithRegistersModel if spec.registers else Dinov2Model
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config)
        source = f"random init (seed {seed})"
    else:
        path = resolve_weights(name, weights)
        with torch.device("meta"):  # no point initialising what the checkpoint replaces
            model = model_cls(config)
        _load_weights(model, path, spec)
        source = str(path)
        logger.info("loaded %s weights from %s", name, path)
    return Backbone(spec, model, source)


def _official_interpolate_pos_encoding(self: Any, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Official DINOv2 ``interpolate_pos_encoding``, bound onto an HF embeddings module.

    embeddings: (B, 1 + N, C) tokens before registers; returns (1, 1 + N, C). As in the official code,
    the table is used as is when the token count matches and the image is square; otherwise bicubic
    with a scale factor ``(grid + offset) / M`` when ``offset`` is set, else to the exact grid size.
    """
    offset, antialias, patch = self.ssvt_interpolation
    pos = self.position_embeddings
    n = pos.shape[1] - 1
    if embeddings.shape[1] - 1 == n and height == width:
        return pos
    m = math.isqrt(n)
    rows, cols = height // patch, width // patch
    grid = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:  # the scale factor itself (not rows / m) sets the sampling positions
        scale = ((rows + offset) / m, (cols + offset) / m)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=antialias)
    if grid.shape[-2:] != (rows, cols):
        raise ConfigError(f"position grid interpolated to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    return torch.cat((pos[:, :1].float(), grid), dim=1).to(embeddings.dtype)


class Backbone(nn.Module):
    """A frozen DINOv2 (HF model inside) returning official-equivalent normed tokens of chosen blocks.

    Always in eval mode with ``requires_grad=False``; the caller chooses inference_mode / autocast.
    """

    def __init__(self, spec: BackboneSpec, model: Dinov2Model | Dinov2WithRegistersModel, weights_source: str):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights_source = weights_source
        self._fingerprint: str | None = None
        # transformers interpolates to the target size; the official models do not (see BackboneSpec)
        embeddings: Any = model.embeddings
        embeddings.ssvt_interpolation = (spec.interpolate_offset, spec.interpolate_antialias, spec.patch)
        embeddings.interpolate_pos_encoding = types.MethodType(_official_interpolate_pos_encoding, embeddings)
        self.requires_grad_(False)
        self.eval()

    hidden_size = property(lambda self: self.spec.hidden_size, doc="channels C of one block's tokens")
    depth = property(lambda self: self.spec.depth, doc="number of transformer blocks")
    patch_size = property(lambda self: self.spec.patch, doc="pixels per token side (14)")
    mean = property(lambda self: self.spec.mean, doc="RGB normalisation mean (ImageNet)")
    std = property(lambda self: self.spec.std, doc="RGB normalisation std (ImageNet)")

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the weights in the official layout, so it does not depend on the transformers version."""
        if self._fingerprint is None:
            self._fingerprint = checkpoints.fingerprint(to_official_state_dict(self))
        return self._fingerprint

    def train(self, mode: bool = True) -> Backbone:
        """Stays in eval mode: the backbone is frozen."""
        return super().train(False)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Backbone:
        before = [p.dtype for p in self.parameters()]
        super()._apply(fn, *args, **kwargs)
        if [p.dtype for p in self.parameters()] != before:
            self._fingerprint = None  # a dtype change changes the bytes; a device move does not
        return self

    def forward(self, pixels: torch.Tensor, layers: Sequence[int] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels: (B, 3, H, W) normalised, H and W multiples of 14.

        Returns patch tokens (B, H/14, W/14, C * len(layers)) and CLS (B, C * len(layers)): each
        selected block's output with the final LayerNorm, concatenated on channels in ``layers`` order;
        registers dropped.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ConfigError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        batch, _, height, width = pixels.shape
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(f"image size {height}x{width} is not a multiple of {self.patch_size}; pad it first")
        layers = resolve_layers(layers, self.depth)
        x = self.model.embeddings(pixels)
        normed: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model.encoder.layer[: max(layers) + 1]):
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x  # transformers 4.x layers return tuples
            if i in layers:
                normed[i] = self.model.layernorm(x)
        skip = 1 + self.spec.registers
        patches = torch.cat([normed[i][:, skip:] for i in layers], dim=-1)
        cls = torch.cat([normed[i][:, 0] for i in layers], dim=-1)
        return patches.reshape(batch, height // self.patch_size, width // self.patch_size, -1), cls


def to_official_state_dict(backbone: Backbone | nn.Module) -> dict[str, torch.Tensor]:
    """The weights in the official DINOv2 layout (what ``dinov2_vits14_pretrain.pth`` holds)."""
    model = backbone.model if isinstance(backbone, Backbone) else backbone
    return checkpoints.hf_to_official(model.state_dict())


def resolve_layers(spec: str | Sequence[int], depth: int) -> tuple[int, ...]:
    """Block indices from ``"last"``, ``"lastN"``, ``"8,9,10,11"`` or ints (negative from the end).

    >>> resolve_layers("last4", 12), resolve_layers([-1, 0], 12)
    ((8, 9, 10, 11), (11, 0))
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if match := re.fullmatch(r"last(\d*)", text):
            count = int(match.group(1) or 1)
            if not 1 <= count <= depth:
                raise ConfigError(f"layers {spec!r}: the backbone has {depth} blocks")
            return tuple(range(depth - count, depth))
        try:
            items: list[int] = [int(t) for t in text.split(",")]
        except ValueError as exc:
            raise ConfigError(f"layers {spec!r}: expected 'last', 'lastN' or comma-separated ints") from exc
    else:
        items = list(spec)
    resolved = tuple(_block_index(i, depth) for i in items)
    if not resolved or len(set(resolved)) != len(resolved):
        raise ConfigError(f"layers {spec!r}: need at least one block and no repeats")
    return resolved


def _block_index(item: object, depth: int) -> int:
    """``item`` as a block index in ``[0, depth)``; negative counts from the end."""
    try:
        index = operator.index(item)  # type: ignore[arg-type]  # ints, numpy ints; not floats
    except TypeError:
        index = None
    if isinstance(item, bool) or index is None or not -depth <= index < depth:
        raise ConfigError(f"layer {item!r} is out of range for a backbone with {depth} blocks")
    return index % depth
