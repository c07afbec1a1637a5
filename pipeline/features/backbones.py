"""Backbones: a registry, weight resolution and the frozen feature extractor.

Families: DINOv2 (patch 14), DINO and iBOT (patch 16 or 8, learnt positions), DINOv3 (patch 16,
rotary positions); their internals live in :mod:`pipeline.features.families`, their weight files in
:mod:`pipeline.features.checkpoints`. Features equal the official implementation's
``get_intermediate_layers`` after the final norm at any input size that is a multiple of the patch,
including its position-embedding interpolation::

    backbone = build_backbone("dinov2_vitl14", weights="pretrained")   # or a path, or None = random
    layers = resolve_layers("last4", backbone.depth)
    with torch.inference_mode():
        patches, cls = backbone(pixels, layers)   # (B, H/p, W/p, 4C), (B, 4C); p = backbone.patch_size
"""

from __future__ import annotations

import logging
import operator
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError, WeightsError, WeightsNotFoundError
from pipeline.features import checkpoints
from pipeline.features.families import FAMILIES, BackboneSpec, Family, all_specs
from pipeline.features.families.base import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRETRAINED",
    "Backbone",
    "BackboneSpec",
    "build_backbone",
    "get_spec",
    "list_backbones",
    "overridable",
    "resolve_layers",
    "resolve_weights",
    "to_official_state_dict",
]

#: ``weights=PRETRAINED`` looks in the torch hub cache, then the HF cache, then downloads.
PRETRAINED = "pretrained"


_REGISTRY = {spec.name: spec for spec in all_specs()}
#: Read-only view of the registry: name -> spec.
BACKBONES: Mapping[str, BackboneSpec] = types.MappingProxyType(_REGISTRY)


def list_backbones(*, include_test: bool = True) -> list[str]:
    """Registered backbone names, in registry order; ``include_test=False`` leaves out the test-sized ones."""
    return [name for name, spec in _REGISTRY.items() if include_test or not spec.test_only]


def get_spec(name: str) -> BackboneSpec:
    """The registry entry ``name``; ConfigError listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


_INTEGERS = frozenset(
    {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_register_tokens", "intermediate_size"}
    | {"image_size", "patch_size"}
)


def overridable(name: str) -> frozenset[str]:
    """HF config fields that ``overrides`` may change for backbone ``name`` (architecture only)."""
    return FAMILIES[get_spec(name).family].overridable


def _configure(spec: BackboneSpec, overrides: Mapping[str, Any]) -> tuple[BackboneSpec, Any]:
    """The entry's HF config with ``overrides`` merged in, and the spec describing the result.

    A ``patch_size`` override without an ``image_size`` keeps the position grid: the image size follows.
    """
    family = FAMILIES[spec.family]
    unknown = sorted(set(overrides) - family.overridable)
    if unknown:
        raise ConfigError(
            f"cannot override {', '.join(unknown)} of {spec.name}; overridable: {', '.join(sorted(family.overridable))}"
        )
    wrong = [f"{k}={v!r}" for k, v in overrides.items() if k in _INTEGERS and type(v) is not int]
    if wrong:
        raise ConfigError(f"overrides for {spec.name} must be integers: {', '.join(wrong)}")
    overrides = dict(overrides)
    if "patch_size" in overrides and "image_size" not in overrides:
        overrides["image_size"] = spec.image_size // spec.patch * overrides["patch_size"]
    kwargs = family.config_kwargs(spec, overrides)
    dim, heads, depth, size, patch = (
        kwargs[k] for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "image_size", "patch_size")
    )
    if depth < 1 or heads < 1 or patch < 1 or dim % heads or size % patch:
        raise ConfigError(
            f"bad overrides for {spec.name}: need depth >= 1, hidden_size divisible by heads and image_size a "
            f"multiple of patch_size; got depth={depth}, hidden_size={dim}, heads={heads}, image_size={size}, "
            f"patch_size={patch}"
        )
    family.validate(spec, kwargs)
    try:
        config = family.make_config(kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # transformers' strict config validation has its own error types
        raise ConfigError(f"bad overrides for {spec.name}: {exc}") from exc
    registers = kwargs.get("num_register_tokens", 0)
    spec = replace(
        spec, hidden_size=dim, depth=depth, heads=heads, ffn=family.ffn(kwargs), registers=registers, image_size=size, patch=patch
    )
    return spec, config


def resolve_weights(name: str, weights: str | Path | None = None, *, allow_download: bool = True) -> Path:
    """Where ``name``'s weights are: a file or an HF model directory.

    ``weights`` is a path (an official ``.pth`` such as ``*_pretrain.pth`` or iBOT's
    ``checkpoint_teacher.pth``, a state dict, or an HF directory with config.json + model.safetensors),
    or None / ``"pretrained"`` to search, in order: the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/<spec.checkpoint>``), the Hugging Face cache, a download (skipped when
    ``HF_HUB_OFFLINE`` is set). Raises WeightsNotFoundError saying where to put the file.
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
    if spec.licence:
        hf_note += f"; {name} is gated: accept the {spec.licence} first (on Hugging Face too, then `hf auth login`)"
    raise WeightsNotFoundError(
        f"no weights found for {name}: place {spec.checkpoint}{source} at {hub_file}, or pass "
        f"--weights PATH (an official .pth or a Hugging Face model directory); {hf_note}"
    )


def _check_hf_config(path: Path, spec: BackboneSpec) -> None:
    """An HF directory's config.json must describe the same architecture (heads are not in the shapes)."""
    found = checkpoints.read_hf_config(path)
    family = FAMILIES[spec.family]
    model_type = found.get("model_type")
    if model_type is not None and model_type not in family.model_types:
        raise WeightsError(f"{path} holds a {model_type} model, not {spec.name} ({' or '.join(family.model_types)})")
    expected = family.hf_config_expected(spec)
    wrong = [f"{k}={found.get(k, default)} (need {v})" for k, (v, default) in expected.items() if found.get(k, default) != v]
    if wrong:
        raise WeightsError(f"{path}/config.json does not describe {spec.name}: {', '.join(wrong)}")


def _load_weights(model: nn.Module, path: Path, spec: BackboneSpec) -> None:
    """Load ``path`` into ``model`` (built on the meta device) with strict key matching."""
    family = FAMILIES[spec.family]
    state = checkpoints.read_state_dict(path)
    if path.is_dir():
        _check_hf_config(path, spec)
    official = state if checkpoints.is_official_layout(state) else family.hf_to_official(state, spec)
    official = {k: v.float() if v.is_floating_point() else v for k, v in official.items()}
    converted = family.official_to_hf(official, model.state_dict(), spec)
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
    :func:`resolve_weights`. overrides: HF config fields (:func:`overridable`) merged over the entry,
    e.g. ``{"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 3}`` or
    ``{"patch_size": 16}`` (``Backbone.patch_size`` follows).
    """
    spec, config = _configure(get_spec(name), overrides or {})
    family = FAMILIES[spec.family]
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = family.build(config)
        source = f"random init (seed {seed})"
    else:
        path = resolve_weights(name, weights)
        with torch.device("meta"):  # no point initialising what the checkpoint replaces
            model = family.build(config)
        _load_weights(model, path, spec)
        source = str(path)
        logger.info("loaded %s weights from %s", name, path)
    return Backbone(spec, model, source)


class Backbone(nn.Module):
    """A frozen ViT (an HF model inside) returning official-equivalent normed tokens of chosen blocks.

    Always in eval mode with ``requires_grad=False``; the caller chooses inference_mode / autocast.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_source: str):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights_source = weights_source
        self._fingerprint: str | None = None
        self._family: Family = FAMILIES[spec.family]
        # e.g. transformers interpolates positions to the target size; the official models do not
        self._family.prepare(model, spec)
        meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if meta:
            raise WeightsError(f"{spec.name}: tensors without values after loading: {', '.join(meta[:5])}")
        self.requires_grad_(False)
        self.eval()

    hidden_size = property(lambda self: self.spec.hidden_size, doc="channels C of one block's tokens")
    depth = property(lambda self: self.spec.depth, doc="number of transformer blocks")
    patch_size = property(lambda self: self.spec.patch, doc="pixels per token side (14, 16 or 8)")
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
        """pixels: (B, 3, H, W) normalised, H and W multiples of the patch size p.

        Returns patch tokens (B, H/p, W/p, C * len(layers)) and CLS (B, C * len(layers)): each
        selected block's output with the final LayerNorm, concatenated on channels in ``layers`` order;
        registers dropped.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ConfigError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        batch, _, height, width = pixels.shape
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(f"image size {height}x{width} is not a multiple of {self.patch_size}; pad it first")
        layers = resolve_layers(layers, self.depth)
        x, block_kwargs = self._family.embed(self.model, pixels)
        norm = self._family.final_norm(self.model)
        normed: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self._family.blocks(self.model)[: max(layers) + 1]):
            x = self._block(layer, x, block_kwargs)
            x = x[0] if isinstance(x, tuple) else x  # transformers 4.x layers return tuples
            if i in layers:
                normed[i] = norm(x)
        skip = 1 + self.spec.registers
        patches = torch.cat([normed[i][:, skip:] for i in layers], dim=-1)
        cls = torch.cat([normed[i][:, 0] for i in layers], dim=-1)
        return patches.reshape(batch, height // self.patch_size, width // self.patch_size, -1), cls

    def _block(self, layer: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        """One transformer block (a hook for the trainable copy, which may checkpoint it)."""
        return layer(x, **kwargs)


def to_official_state_dict(backbone: Backbone | nn.Module) -> dict[str, torch.Tensor]:
    """The weights in the family's official layout (what ``dinov2_vits14_pretrain.pth``,
    ``dino_deitsmall16_pretrain.pth`` ... hold); a bare HF model is read as a DINOv2."""
    if isinstance(backbone, Backbone):
        return FAMILIES[backbone.spec.family].hf_to_official(backbone.model.state_dict(), backbone.spec)
    return checkpoints.hf_to_official(backbone.state_dict())


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
