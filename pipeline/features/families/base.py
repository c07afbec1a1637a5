"""What a backbone family provides: the registry entry type and the per-family hooks.

A family wraps one transformers model class (``Dinov2Model``, ``ViTModel``, ``DINOv3ViTModel``) and
knows its config, its official <-> Hugging Face key layout and how to run its blocks one at a time,
so that :class:`pipeline.features.backbones.Backbone` can return each selected block's tokens after
the final norm, as the official ``get_intermediate_layers(norm=True)`` does::

    family = FAMILIES[spec.family]
    x, block_kwargs = family.embed(model, pixels)
    for block in family.blocks(model):
        x = block(x, **block_kwargs)
    tokens = family.final_norm(model)(x)
"""

from __future__ import annotations

import math
import types
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.features import checkpoints

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: architecture, where its weights live, and how it interpolates positions.

    ``interpolate_offset`` / ``interpolate_antialias`` are the official settings for learnt position
    embeddings: DINO, iBOT and non-register DINOv2 models interpolate with scale factor
    ``(grid + 0.1) / M`` and no antialias; DINOv2 register models to the exact grid size with
    antialias; DINOv3 (rotary embeddings) does not interpolate. ``checkpoint`` is the official file's
    name in the torch hub cache; ``licence`` names a licence the user accepts before downloading.
    """

    name: str
    hf_id: str | None
    hidden_size: int
    depth: int
    heads: int
    ffn: Literal["mlp", "swiglu"]
    registers: int
    checkpoint: str
    patch: int = 14
    image_size: int = 518
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    family: Literal["dinov2", "dino", "ibot", "dinov3"] = "dinov2"
    url: str | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    licence: str | None = None
    test_only: bool = False


class Family(ABC):
    """Hooks for one model family; stateless, one instance per family."""

    #: HF config fields that ``overrides`` may change (architecture only).
    overridable: ClassVar[frozenset[str]]
    #: ``model_type`` values an HF ``config.json`` of this family has.
    model_types: ClassVar[tuple[str, ...]]

    @abstractmethod
    def config_kwargs(self, spec: BackboneSpec, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """HF config fields for ``spec`` with ``overrides`` merged in (derived sizes follow them)."""

    def validate(self, spec: BackboneSpec, kwargs: Mapping[str, Any]) -> None:  # noqa: B027  # optional hook
        """Raise ConfigError for family-specific impossibilities (the generic checks are done)."""

    @abstractmethod
    def make_config(self, kwargs: dict[str, Any]) -> Any:
        """The transformers config object."""

    @abstractmethod
    def ffn(self, kwargs: Mapping[str, Any]) -> Literal["mlp", "swiglu"]:
        """The feed-forward kind ``kwargs`` describe."""

    @abstractmethod
    def build(self, config: Any) -> nn.Module:
        """A transformers model for ``config`` (random init, or empty on the meta device)."""

    def prepare(self, model: nn.Module, spec: BackboneSpec) -> None:  # noqa: B027  # optional hook
        """Make ``model`` compute like the official code (position interpolation, meta buffers)."""

    @abstractmethod
    def layout(self, spec: BackboneSpec) -> checkpoints.KeyLayout:
        """Official <-> Hugging Face key names."""

    def official_to_hf(
        self, official: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], spec: BackboneSpec
    ) -> dict[str, torch.Tensor]:
        """An official state dict in the names and shapes of ``target``, the model's own state dict."""
        return checkpoints.official_to_hf(official, target, self.layout(spec))

    def hf_to_official(self, state: Mapping[str, torch.Tensor], spec: BackboneSpec) -> dict[str, torch.Tensor]:
        """A Hugging Face state dict (any transformers version) in the official layout."""
        return checkpoints.hf_to_official(state, self.layout(spec))

    @abstractmethod
    def hf_config_expected(self, spec: BackboneSpec) -> dict[str, tuple[Any, Any]]:
        """``config.json`` field -> (value ``spec`` needs, the default when the field is absent)."""

    @abstractmethod
    def embed(self, model: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Tokens entering the first block, ``[CLS, registers..., patches...]``, and block kwargs."""

    @abstractmethod
    def blocks(self, model: Any) -> Sequence[nn.Module]:
        """The transformer blocks in order."""

    @abstractmethod
    def final_norm(self, model: Any) -> nn.Module:
        """The final norm, applied to every selected block's output."""


def official_interpolate_pos_encoding(self: Any, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The official DINO / iBOT / DINOv2 ``interpolate_pos_encoding``, bound onto an HF embeddings module.

    embeddings: (B, 1 + N, C) tokens before registers; returns (1, 1 + N, C). As in the official code,
    the table is used as is when the token count matches and the image is square; otherwise bicubic
    with a scale factor ``(grid + offset) / M`` when ``offset`` is set, else to the exact grid size.
    transformers always interpolates to the exact grid size, which samples other positions.
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


def use_official_interpolation(embeddings: Any, spec: BackboneSpec) -> None:
    """Replace an HF embeddings module's ``interpolate_pos_encoding`` by the official one for ``spec``."""
    embeddings.ssvt_interpolation = (spec.interpolate_offset, spec.interpolate_antialias, spec.patch)
    embeddings.interpolate_pos_encoding = types.MethodType(official_interpolate_pos_encoding, embeddings)
