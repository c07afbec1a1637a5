"""A trainable copy of a frozen :class:`~pipeline.features.backbones.Backbone`, for ``ssvt finetune``.

The frozen wrapper stays what every other stage uses (eval mode, no gradients); fine-tuning works on
a deep copy, so the backbone it came from is never changed::

    tuned = TunableBackbone.from_frozen(build_backbone("dinov2_vits14", "pretrained"), grad_checkpointing=True)
    groups = layer_decay_groups(tuned, lr=1e-5, decay=0.9)      # AdamW parameter groups, one per block
    patches, cls = tuned(pixels, (11,))                          # same tokens as the frozen one, with gradients
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.features import checkpoints
from pipeline.features.backbones import Backbone, to_official_state_dict
from pipeline.features.families import FAMILIES, BackboneSpec


class TunableBackbone(Backbone):
    """A :class:`Backbone` whose weights train: ``requires_grad`` on, ``train()`` obeyed, fingerprint not cached.

    With ``grad_checkpointing`` each block's activations are recomputed in the backward pass
    (``torch.utils.checkpoint``, non-reentrant) instead of kept, for any family and transformers version.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_source: str, *, grad_checkpointing: bool = False):
        super().__init__(spec, model, weights_source)
        self.grad_checkpointing = grad_checkpointing
        self.requires_grad_(True)
        self.train()

    @classmethod
    def from_frozen(cls, backbone: Backbone, *, grad_checkpointing: bool = False) -> TunableBackbone:
        """A trainable deep copy of ``backbone``; ``backbone`` itself stays frozen and unchanged."""
        return cls(backbone.spec, copy.deepcopy(backbone.model), backbone.weights_source, grad_checkpointing=grad_checkpointing)

    def train(self, mode: bool = True) -> TunableBackbone:
        return nn.Module.train(self, mode)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the current weights in the official layout (recomputed: they change while training)."""
        return checkpoints.fingerprint(to_official_state_dict(self))

    def _block(self, layer: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, x, use_reentrant=False, **kwargs)
        return layer(x, **kwargs)


def layer_decay_groups(backbone: Backbone, lr: float, decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``backbone`` with layer-wise learning-rate decay.

    Block i of ``depth`` blocks gets ``lr * decay ** (depth - 1 - i)``; the final norm ``lr``; everything
    else (patch, class, register and position embeddings: "embeddings") ``lr * decay ** depth``, the
    lowest. Each group carries a ``name``: "embeddings", "block 0" ... "block <depth-1>", "norm".
    """
    family = FAMILIES[backbone.spec.family]
    blocks = list(family.blocks(backbone.model))
    depth = len(blocks)
    owner: dict[int, str] = {}
    for i, block in enumerate(blocks):
        owner.update((id(p), f"block {i}") for p in block.parameters())
    owner.update((id(p), "norm") for p in family.final_norm(backbone.model).parameters())
    rates = {f"block {i}": lr * decay ** (depth - 1 - i) for i in range(depth)} | {"embeddings": lr * decay**depth, "norm": lr}
    params: dict[str, list[nn.Parameter]] = {name: [] for name in ["embeddings", *(f"block {i}" for i in range(depth)), "norm"]}
    for p in backbone.parameters():
        params[owner.get(id(p), "embeddings")].append(p)
    return [{"name": name, "params": ps, "lr": rates[name]} for name, ps in params.items() if ps]
