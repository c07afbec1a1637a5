"""DINOv3 (facebookresearch/dinov3): ViTs at patch 16 with rotary position embeddings (no
interpolation: any grid), 4 registers and layer scale, run in transformers' ``DINOv3ViTModel``
(transformers >= 4.56). Weights are gated: the user accepts the DINOv3 License first::

    spec = next(s for s in specs() if s.name == "dinov3_vitl16")

Official files (``dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth``) differ from the HF layout in three
ways handled here: the fused qkv bias has a key part that ``bias_mask`` zeroes (HF has no key bias),
``rope_embed.periods`` is stored (HF computes it from ``rope_theta``), and the 7B keeps a
``local_cls_norm`` used only on training crops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import transformers
from torch import nn

from pipeline.errors import ConfigError, WeightsError
from pipeline.features import checkpoints
from pipeline.features.families.base import BackboneSpec, Family

ACCESS = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
LICENCE = "DINOv3 License"
ROPE_BASE = 100.0

_ARCHS = {  # hub arch: dim, depth, heads, FFN ratio, FFN, qkv bias, file hash (LVD-1689M weights)
    "vits16": (384, 12, 6, 4.0, "mlp", True, "08c60483"),
    "vits16plus": (384, 12, 6, 6.0, "swiglu", True, "4057cbaa"),
    "vitb16": (768, 12, 12, 4.0, "mlp", True, "73cec8be"),
    "vitl16": (1024, 24, 16, 4.0, "mlp", True, "8aa4cbdd"),
    "vith16plus": (1280, 32, 20, 6.0, "swiglu", True, "7c1da9a5"),
    "vit7b16": (4096, 40, 32, 3.0, "swiglu", False, "a955f4ea"),
}


def specs() -> list[BackboneSpec]:
    """The LVD-1689M ViTs, then a test-sized model."""
    out = []
    for arch, (dim, depth, heads, ratio, ffn, qkv_bias, digest) in _ARCHS.items():
        out.append(
            BackboneSpec(
                name=f"dinov3_{arch}",
                hf_id=f"facebook/dinov3-{arch}-pretrain-lvd1689m",
                hidden_size=dim,
                depth=depth,
                heads=heads,
                ffn=ffn,  # type: ignore[arg-type]
                registers=4,
                checkpoint=f"dinov3_{arch}_pretrain_lvd1689m-{digest}.pth",
                patch=16,
                image_size=224,
                interpolate_offset=0.0,
                family="dinov3",
                url=ACCESS,  # the file addresses come by e-mail once the licence is accepted
                mlp_ratio=ratio,
                qkv_bias=qkv_bias,
                licence=LICENCE,
            )
        )
    out.append(
        BackboneSpec(
            name="dinov3_tiny_test",
            hf_id=None,
            hidden_size=48,
            depth=3,
            heads=3,
            ffn="mlp",
            registers=4,
            checkpoint="dinov3_tiny_test_pretrain.pth",
            patch=16,
            image_size=64,
            interpolate_offset=0.0,
            family="dinov3",
            test_only=True,
        )
    )
    return out


def swiglu_hidden(dim: int, ratio: float, align: int = 8) -> int:
    """Hidden width of the official SwiGLU FFN: 2/3 of ``dim * ratio``, rounded up to ``align``."""
    d = int(int(dim * ratio) * 2 / 3)
    return d + (-d % align)


def rope_periods(dim: int, heads: int) -> torch.Tensor:
    """The official ``rope_embed.periods`` (float32, ``head_dim // 4`` values) for base 100."""
    head_dim = dim // heads
    return ROPE_BASE ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def _layout(ffn: str) -> checkpoints.KeyLayout:
    blocks: dict[str, tuple[tuple[str | None, ...], ...]] = {"ls1.gamma": (("layer_scale1.lambda1",),)}
    blocks["ls2.gamma"] = (("layer_scale2.lambda1",),)
    mlp = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if ffn == "swiglu" else {"fc1": "up_proj", "fc2": "down_proj"}
    for p in ("weight", "bias"):
        blocks[f"norm1.{p}"] = ((f"norm1.{p}",),)
        blocks[f"norm2.{p}"] = ((f"norm2.{p}",),)
        blocks[f"attn.proj.{p}"] = ((f"attention.o_proj.{p}",),)
        blocks.update({f"mlp.{a}.{p}": ((f"mlp.{b}.{p}",),) for a, b in mlp.items()})
    blocks["attn.qkv.weight"] = (tuple(f"attention.{x}_proj.weight" for x in "qkv"),)
    blocks["attn.qkv.bias"] = (("attention.q_proj.bias", None, "attention.v_proj.bias"),)
    return checkpoints.KeyLayout(
        globals={
            "cls_token": (("embeddings.cls_token",),),
            "storage_tokens": (("embeddings.register_tokens",),),
            "mask_token": (("embeddings.mask_token",),),
            "patch_embed.proj.weight": (("embeddings.patch_embeddings.weight",),),
            "patch_embed.proj.bias": (("embeddings.patch_embeddings.bias",),),
            "norm.weight": (("norm.weight",),),
            "norm.bias": (("norm.bias",),),
        },
        blocks=blocks,
        block_prefixes=("model.layer.{i}.", "layer.{i}."),  # transformers 5.x in memory; 4.x and files
    )


LAYOUTS = {"mlp": _layout("mlp"), "swiglu": _layout("swiglu")}


def _model_classes() -> tuple[Any, Any]:
    try:
        from transformers import DINOv3ViTConfig, DINOv3ViTModel
    except ImportError as exc:
        raise ConfigError(f"DINOv3 needs transformers >= 4.56; {transformers.__version__} is installed") from exc
    return DINOv3ViTConfig, DINOv3ViTModel


class Dinov3Family(Family):
    overridable = frozenset(
        {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "use_gated_mlp"}
        | {"image_size", "patch_size", "layer_norm_eps"}
    )
    model_types = ("dinov3_vit",)

    def config_kwargs(self, spec: BackboneSpec, overrides: Mapping[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "hidden_size": spec.hidden_size,
            "num_hidden_layers": spec.depth,
            "num_attention_heads": spec.heads,
            "num_register_tokens": spec.registers,
            "use_gated_mlp": spec.ffn == "swiglu",
            "image_size": spec.image_size,
            "patch_size": spec.patch,
            "layer_norm_eps": 1e-5,  # the official "layernormbf16"
            "rope_theta": ROPE_BASE,
            "query_bias": spec.qkv_bias,
            "key_bias": False,
            "value_bias": spec.qkv_bias,
            "proj_bias": True,
            "mlp_bias": True,
            "layerscale_value": 1.0,
        } | dict(overrides)
        gated, dim = kwargs["use_gated_mlp"], kwargs["hidden_size"]
        kwargs["hidden_act"] = "silu" if gated else "gelu"
        kwargs.setdefault("intermediate_size", swiglu_hidden(dim, spec.mlp_ratio) if gated else int(dim * spec.mlp_ratio))
        return kwargs

    def validate(self, spec: BackboneSpec, kwargs: Mapping[str, Any]) -> None:
        dim, heads = kwargs["hidden_size"], kwargs["num_attention_heads"]
        if dim % (4 * heads):
            raise ConfigError(f"bad overrides for {spec.name}: rotary embeddings need hidden_size / heads divisible by 4")

    def make_config(self, kwargs: dict[str, Any]) -> Any:
        return _model_classes()[0](**kwargs)

    def ffn(self, kwargs: Mapping[str, Any]) -> Literal["mlp", "swiglu"]:
        return "swiglu" if kwargs["use_gated_mlp"] else "mlp"

    def build(self, config: Any) -> nn.Module:
        return _model_classes()[1](config)

    def prepare(self, model: nn.Module, spec: BackboneSpec) -> None:
        rope: Any = model.rope_embeddings
        if rope.inv_freq.is_meta:  # a non-persistent buffer: built on the meta device, never loaded
            model.rope_embeddings = type(rope)(model.config)

    def layout(self, spec: BackboneSpec) -> checkpoints.KeyLayout:
        return LAYOUTS[spec.ffn]

    def official_to_hf(
        self, official: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], spec: BackboneSpec
    ) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in official.items() if not k.startswith("local_cls_norm.")}  # training crops only
        periods = state.pop("rope_embed.periods", None)
        expected = rope_periods(spec.hidden_size, spec.heads)
        if periods is not None and (periods.shape != expected.shape or not torch.allclose(periods.float(), expected, rtol=1e-2)):
            raise WeightsError(f"rope_embed.periods of the weights do not match {spec.name} (RoPE base {ROPE_BASE:g})")
        for key in [k for k in state if k.endswith(".attn.qkv.bias")]:
            mask = state.pop(key + "_mask", None)
            bias = state[key] if mask is None else state[key] * mask.to(state[key].dtype)
            if bias.chunk(3)[1].any():
                raise WeightsError(f"{key} has a key part that is not masked to zero; transformers' DINOv3 has no key bias")
            state[key] = bias
        return checkpoints.official_to_hf(state, target, self.layout(spec))

    def hf_to_official(self, state: Mapping[str, torch.Tensor], spec: BackboneSpec) -> dict[str, torch.Tensor]:
        official = checkpoints.hf_to_official(state, self.layout(spec))
        for key in [k for k in official if k.endswith(".attn.qkv.bias")]:
            q, k, _ = official[key].chunk(3)
            official[key + "_mask"] = torch.cat([torch.ones_like(q), torch.zeros_like(k), torch.ones_like(q)])
        official["rope_embed.periods"] = rope_periods(spec.hidden_size, spec.heads)
        return official

    def hf_config_expected(self, spec: BackboneSpec) -> dict[str, tuple[Any, Any]]:
        return {
            "hidden_size": (spec.hidden_size, None),
            "num_hidden_layers": (spec.depth, None),
            "num_attention_heads": (spec.heads, None),
            "patch_size": (spec.patch, 16),
            "num_register_tokens": (spec.registers, 0),
            "use_gated_mlp": (spec.ffn == "swiglu", False),
        }

    def embed(self, model: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        pixels = pixels.to(model.embeddings.patch_embeddings.weight.dtype)  # as DINOv3ViTModel.forward
        return model.embeddings(pixels), {"position_embeddings": model.rope_embeddings(pixels)}

    def blocks(self, model: Any) -> Sequence[nn.Module]:
        return getattr(model, "model", model).layer  # 5.x: model.model.layer; 4.x: model.layer

    def final_norm(self, model: Any) -> nn.Module:
        return model.norm
