"""Light segmentation heads on cached patch tokens, built by name from a small registry.

A head is one class plus one :func:`register_head` line; the CLI choices and help, the config check
and the tests read the registry, so nothing else needs to change to add one.

A head maps tokens (B, h, w, C) (any float dtype; float16 from the cache is cast to the head's dtype)
to logits (B, K, h, w) at patch resolution; the loss upsamples them (see :mod:`pipeline.training.losses`).
``C`` may be ``n_layers`` cached blocks concatenated on channels (groups of ``C / n_layers``)::

    head = build_head("bn-linear", in_channels=1024, num_classes=21)
    logits = head(tokens)                          # (B, 21, h, w)
    same = head_from_config(head.config)           # rebuild for a checkpoint, then load_state_dict
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_HEAD = "bn-linear"


@dataclass(frozen=True)
class HeadSpec:
    """One registry entry: the name used in configs, the class that builds it and a one-line help."""

    name: str
    builder: Callable[..., SegHead]
    description: str


#: name -> entry, in registration order (the order of the help texts).
HEADS: dict[str, HeadSpec] = {}
H = TypeVar("H", bound="type[SegHead]")


def register_head(name: str, description: str) -> Callable[[H], H]:
    """Class decorator: register a :class:`SegHead` subclass under ``name``. Its ``__init__`` takes
    ``(in_channels, num_classes, n_layers=1, **options)``; the options' defaults are its defaults."""

    def add(cls: H) -> H:
        if name in HEADS:
            raise ConfigError(f"head {name!r} is registered already")
        HEADS[name] = HeadSpec(name, cls, description)
        return cls

    return add


def check_head(name: str) -> HeadSpec:
    """The registry entry ``name``; ConfigError listing the valid heads otherwise."""
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; valid heads: {', '.join(HEADS)}")
    return HEADS[name]


def heads_help() -> str:
    """Every head with its one-line description, for help texts."""
    return "; ".join(f"{spec.name}: {spec.description}" for spec in HEADS.values())


class SegHead(nn.Module):
    """Base class: checks and permutes tokens, then runs ``self.body`` on (B, C, h, w).

    ``config`` holds every keyword :func:`build_head` needs to rebuild the head (JSON-serialisable).
    """

    body: nn.Module

    def __init__(self, in_channels: int, num_classes: int, n_layers: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.n_layers = n_layers
        self.config: dict[str, Any] = {}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, h, w, C) -> logits (B, K, h, w)."""
        if tokens.dim() != 4 or tokens.shape[-1] != self.in_channels:
            raise ConfigError(
                f"head expects tokens (B, h, w, {self.in_channels}), got {tuple(tokens.shape)}; "
                "was it built for another backbone or layer count?"
            )
        weight = next(self.parameters())
        x = tokens.permute(0, 3, 1, 2).to(weight.dtype)
        return self.body(x)


@register_head("linear", "1x1 conv on the tokens (no normalisation)")
class LinearHead(SegHead):
    """A 1x1 convolution: one linear classifier applied to every patch token."""

    def __init__(self, in_channels: int, num_classes: int, n_layers: int = 1) -> None:
        super().__init__(in_channels, num_classes, n_layers)
        self.body = nn.Conv2d(in_channels, num_classes, kernel_size=1)


@register_head("bn-linear", "BatchNorm + 1x1 conv, the DINOv2 linear protocol (default)")
class BNLinearHead(SegHead):
    """The DINOv2 "lin" protocol: BatchNorm over all (concatenated) channels, then a 1x1 conv."""

    def __init__(self, in_channels: int, num_classes: int, n_layers: int = 1) -> None:
        super().__init__(in_channels, num_classes, n_layers)
        self.body = nn.Sequential(nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, num_classes, kernel_size=1))


@register_head("mlp", "BatchNorm + 1x1 conv + GELU + 1x1 conv (hidden=256)")
class MLPHead(SegHead):
    """BatchNorm, then a per-token two-layer MLP (1x1 conv, GELU, 1x1 conv)."""

    def __init__(self, in_channels: int, num_classes: int, n_layers: int = 1, hidden: int = 256) -> None:
        super().__init__(in_channels, num_classes, n_layers)
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, hidden, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(hidden, num_classes, kernel_size=1),
        )


@register_head("conv", "BatchNorm + two 3x3 conv/BN/ReLU blocks (hidden=256) + 1x1 conv")
class ConvHead(SegHead):
    """BatchNorm, two 3x3 conv + BN + ReLU blocks (spatial context of 5x5 patches), 1x1 conv to K."""

    def __init__(self, in_channels: int, num_classes: int, n_layers: int = 1, hidden: int = 256) -> None:
        super().__init__(in_channels, num_classes, n_layers)
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_classes, kernel_size=1),
        )


def _defaults(cls: Callable[..., SegHead]) -> dict[str, Any]:
    """The keyword defaults of a head class beyond the common three arguments."""
    params = inspect.signature(cls).parameters
    common = {"in_channels", "num_classes", "n_layers"}
    return {k: p.default for k, p in params.items() if k not in common}


def build_head(name: str, in_channels: int, num_classes: int, *, n_layers: int = 1, **overrides: Any) -> SegHead:
    """A randomly initialised head from the registry.

    ``in_channels`` is the token width C as stored (all ``n_layers`` blocks together); ``overrides``
    merge over the entry's defaults (e.g. ``hidden=64`` for "mlp"/"conv").
    """
    spec = check_head(name)
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes), ("n_layers", n_layers)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if in_channels % n_layers:
        raise ConfigError(f"in_channels={in_channels} is not divisible by n_layers={n_layers}")
    cls = spec.builder
    defaults = _defaults(cls)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise ConfigError(f"head {name!r} has no option(s) {', '.join(unknown)}; valid options: {valid}")
    kwargs = {**defaults, **overrides}
    head = cls(in_channels, num_classes, n_layers, **kwargs)
    head.config = {"name": name, "in_channels": in_channels, "num_classes": num_classes, "n_layers": n_layers, **kwargs}
    logger.debug("built head %s (%d parameters)", head.config, sum(p.numel() for p in head.parameters()))
    return head


def head_from_config(config: Mapping[str, Any]) -> SegHead:
    """Rebuild a head (random weights) from ``head.config``, e.g. as read from a checkpoint."""
    missing = [k for k in ("name", "in_channels", "num_classes") if k not in config]
    if missing:
        raise ConfigError(f"head config lacks {', '.join(missing)}; got keys {sorted(config)}")
    kwargs = dict(config)
    return build_head(kwargs.pop("name"), kwargs.pop("in_channels"), kwargs.pop("num_classes"), **kwargs)
