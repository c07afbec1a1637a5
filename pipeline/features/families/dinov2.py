"""DINOv2 (facebookresearch/dinov2): ViT-S/B/L/g at patch 14, with and without 4 registers, run in
transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel`` with the official interpolation::

    spec = next(s for s in specs() if s.name == "dinov2_vitl14_reg")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from pipeline.errors import ConfigError
from pipeline.features import checkpoints
from pipeline.features.families.base import BackboneSpec, Family, use_official_interpolation

_ARCHS = {  # hub letter: HF size word, dim, depth, heads, FFN
    "s": ("small", 384, 12, 6, "mlp"),
    "b": ("base", 768, 12, 12, "mlp"),
    "l": ("large", 1024, 24, 16, "mlp"),
    "g": ("giant", 1536, 40, 24, "swiglu"),
}


def specs() -> list[BackboneSpec]:
    """The published models, then two test-sized ones (random init or a local file only)."""
    out = []
    for letter, (size, dim, depth, heads, ffn) in _ARCHS.items():
        for reg in (False, True):
            checkpoint = f"dinov2_vit{letter}14{'_reg4' if reg else ''}_pretrain.pth"
            out.append(
                BackboneSpec(
                    name=f"dinov2_vit{letter}14" + ("_reg" if reg else ""),
                    hf_id=f"facebook/dinov2-{'with-registers-' if reg else ''}{size}",
                    hidden_size=dim,
                    depth=depth,
                    heads=heads,
                    ffn=ffn,  # type: ignore[arg-type]
                    registers=4 if reg else 0,
                    checkpoint=checkpoint,
                    interpolate_offset=0.0 if reg else 0.1,
                    interpolate_antialias=reg,
                    url=checkpoints.official_url(checkpoint),
                )
            )
    for reg in (False, True):
        name = "vit_tiny_test" + ("_reg" if reg else "")
        out.append(
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
                test_only=True,
            )
        )
    return out


class Dinov2Family(Family):
    overridable = frozenset(
        {"hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "use_swiglu_ffn"}
        | {"num_register_tokens", "image_size", "patch_size", "layer_norm_eps"}
    )
    model_types = ("dinov2", "dinov2_with_registers")

    def config_kwargs(self, spec: BackboneSpec, overrides: Mapping[str, Any]) -> dict[str, Any]:
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
        return kwargs | dict(overrides)

    def validate(self, spec: BackboneSpec, kwargs: Mapping[str, Any]) -> None:
        if (kwargs.get("num_register_tokens", 0) > 0) != (spec.registers > 0):
            raise ConfigError(f"{spec.name} has {spec.registers} registers; use the other entry (_reg or not)")

    def make_config(self, kwargs: dict[str, Any]) -> Any:
        return (Dinov2WithRegistersConfig if kwargs.get("num_register_tokens") else Dinov2Config)(**kwargs)

    def ffn(self, kwargs: Mapping[str, Any]) -> Literal["mlp", "swiglu"]:
        return "swiglu" if kwargs["use_swiglu_ffn"] else "mlp"

    def build(self, config: Any) -> nn.Module:
        return (Dinov2WithRegistersModel if getattr(config, "num_register_tokens", 0) else Dinov2Model)(config)

    def prepare(self, model: nn.Module, spec: BackboneSpec) -> None:
        use_official_interpolation(model.embeddings, spec)

    def layout(self, spec: BackboneSpec) -> checkpoints.KeyLayout:
        return checkpoints.DINOV2

    def hf_config_expected(self, spec: BackboneSpec) -> dict[str, tuple[Any, Any]]:
        return {
            "hidden_size": (spec.hidden_size, None),
            "num_hidden_layers": (spec.depth, None),
            "num_attention_heads": (spec.heads, None),
            "patch_size": (spec.patch, 14),
            "use_swiglu_ffn": (spec.ffn == "swiglu", False),
            "num_register_tokens": (spec.registers, 0),
        }

    def embed(self, model: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return model.embeddings(pixels), {}

    def blocks(self, model: Any) -> Sequence[nn.Module]:
        return model.encoder.layer

    def final_norm(self, model: Any) -> nn.Module:
        return model.layernorm
