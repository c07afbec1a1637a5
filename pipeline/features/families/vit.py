"""DINO (facebookresearch/dino) and iBOT (bytedance/ibot): the plain ViT of DINO (no layer scale, no
registers, LayerNorm eps 1e-6, learnt position embeddings for 224 px), run in transformers' ``ViTModel``
with the official position interpolation. iBOT's ViT is DINO's (its ``init_values`` layer scale is
off in the released models), so both families share this module::

    spec = next(s for s in specs() if s.name == "ibot_vitl16")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from pipeline.features import checkpoints
from pipeline.features.families.base import BackboneSpec, Family, use_official_interpolation

DINO_URL = "https://dl.fbaipublicfiles.com/dino"
IBOT_URL = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot"

_ARCHS = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}  # hub letter: dim, depth, heads
_DINO = {  # hub name: official file stem, patch
    "dino_vits16": ("dino_deitsmall16", 16),
    "dino_vits8": ("dino_deitsmall8", 8),
    "dino_vitb16": ("dino_vitbase16", 16),
    "dino_vitb8": ("dino_vitbase8", 8),
}
_IBOT = {  # name: folder of the official download, which network its backbone file holds
    "ibot_vits16": ("vits_16", "teacher"),
    "ibot_vitb16": ("vitb_16", "teacher"),
    "ibot_vitl16": ("vitl_16", "teacher"),
    "ibot_vitl16_in22k": ("vitl_16_pt22k", "student"),  # the ImageNet-22k backbone is published as the student
}


def specs() -> list[BackboneSpec]:
    """DINO's four ViTs, iBOT's ViT-S/B/L/16 and L/16 (ImageNet-22k), then a test-sized model."""
    out = []
    for name, (stem, patch) in _DINO.items():
        dim, depth, heads = _ARCHS[name[len("dino_vit")]]
        out.append(
            BackboneSpec(
                name=name,
                hf_id=f"facebook/dino-{name.removeprefix('dino_')}",
                hidden_size=dim,
                depth=depth,
                heads=heads,
                ffn="mlp",
                registers=0,
                checkpoint=f"{stem}_pretrain.pth",
                patch=patch,
                image_size=224,
                family="dino",
                url=f"{DINO_URL}/{stem}_pretrain/{stem}_pretrain.pth",
            )
        )
    for name, (folder, network) in _IBOT.items():
        dim, depth, heads = _ARCHS[name[len("ibot_vit")]]
        out.append(
            BackboneSpec(
                name=name,
                hf_id=None,
                hidden_size=dim,
                depth=depth,
                heads=heads,
                ffn="mlp",
                registers=0,
                checkpoint=f"{name}_checkpoint_{network}.pth",  # the download's own name is the same for all
                patch=16,
                image_size=224,
                family="ibot",
                url=f"{IBOT_URL}/{folder}/checkpoint_{network}.pth",
            )
        )
    out.append(
        BackboneSpec(
            name="dino_tiny_test",
            hf_id=None,
            hidden_size=48,
            depth=3,
            heads=3,
            ffn="mlp",
            registers=0,
            checkpoint="dino_tiny_test_pretrain.pth",
            patch=16,
            image_size=64,  # a 4 x 4 position grid
            family="dino",
            test_only=True,
        )
    )
    return out


def _block_rules() -> dict[str, tuple[tuple[str | None, ...], ...]]:
    rules: dict[str, tuple[tuple[str | None, ...], ...]] = {}
    for p in ("weight", "bias"):
        rules[f"norm1.{p}"] = ((f"layernorm_before.{p}",),)
        rules[f"norm2.{p}"] = ((f"layernorm_after.{p}",),)
        rules[f"attn.qkv.{p}"] = (
            tuple(f"attention.{x}_proj.{p}" for x in "qkv"),
            tuple(f"attention.attention.{x}.{p}" for x in ("query", "key", "value")),
        )
        rules[f"attn.proj.{p}"] = ((f"attention.o_proj.{p}",), (f"attention.output.dense.{p}",))
        rules[f"mlp.fc1.{p}"] = ((f"mlp.fc1.{p}",), (f"intermediate.dense.{p}",))
        rules[f"mlp.fc2.{p}"] = ((f"mlp.fc2.{p}",), (f"output.dense.{p}",))
    return rules


#: transformers 5.x keeps ``layers.i.attention.q_proj`` in memory; 4.x and the files on the hub (which
#: 5.x still writes) ``encoder.layer.i.attention.attention.query``. A saved pooler is not the backbone.
LAYOUT = checkpoints.KeyLayout(
    globals={
        "cls_token": (("embeddings.cls_token",),),
        "pos_embed": (("embeddings.position_embeddings",),),
        "patch_embed.proj.weight": (("embeddings.patch_embeddings.projection.weight",),),
        "patch_embed.proj.bias": (("embeddings.patch_embeddings.projection.bias",),),
        "norm.weight": (("layernorm.weight",),),
        "norm.bias": (("layernorm.bias",),),
    },
    blocks=_block_rules(),
    block_prefixes=("layers.{i}.", "encoder.layer.{i}."),
    hf_ignored=("pooler.",),
)


class VitFamily(Family):
    overridable = frozenset(
        {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"}
        | {"image_size", "patch_size", "layer_norm_eps"}
    )
    model_types = ("vit",)

    def config_kwargs(self, spec: BackboneSpec, overrides: Mapping[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "hidden_size": spec.hidden_size,
            "num_hidden_layers": spec.depth,
            "num_attention_heads": spec.heads,
            "image_size": spec.image_size,
            "patch_size": spec.patch,
            "layer_norm_eps": 1e-6,  # the official norm_layer; the HF dino-* configs say 1e-12
            "hidden_act": "gelu",
            "qkv_bias": True,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        } | dict(overrides)
        kwargs.setdefault("intermediate_size", int(kwargs["hidden_size"] * spec.mlp_ratio))
        return kwargs

    def make_config(self, kwargs: dict[str, Any]) -> Any:
        return ViTConfig(**kwargs)

    def ffn(self, kwargs: Mapping[str, Any]) -> Literal["mlp", "swiglu"]:
        return "mlp"

    def build(self, config: Any) -> nn.Module:
        return ViTModel(config, add_pooling_layer=False)

    def prepare(self, model: nn.Module, spec: BackboneSpec) -> None:
        use_official_interpolation(model.embeddings, spec)

    def layout(self, spec: BackboneSpec) -> checkpoints.KeyLayout:
        return LAYOUT

    def official_to_hf(
        self, official: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], spec: BackboneSpec
    ) -> dict[str, torch.Tensor]:
        # iBOT's student carries the token that replaces masked patches in training; unused otherwise
        official = {k: v for k, v in official.items() if k != "masked_embed"}
        return checkpoints.official_to_hf(official, target, LAYOUT)

    def hf_config_expected(self, spec: BackboneSpec) -> dict[str, tuple[Any, Any]]:
        return {
            "hidden_size": (spec.hidden_size, None),
            "num_hidden_layers": (spec.depth, None),
            "num_attention_heads": (spec.heads, None),
            "patch_size": (spec.patch, 16),
        }

    def embed(self, model: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        pixels = pixels.to(model.embeddings.patch_embeddings.projection.weight.dtype)
        return model.embeddings(pixels, interpolate_pos_encoding=True), {}

    def blocks(self, model: Any) -> Sequence[nn.Module]:
        return model.layers if hasattr(model, "layers") else model.encoder.layer  # 5.x; 4.x

    def final_norm(self, model: Any) -> nn.Module:
        return model.layernorm
