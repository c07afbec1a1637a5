"""Backbone families: one module per model family, each with its registry entries and hooks.

:mod:`pipeline.features.backbones` builds the registry from :func:`all_specs` and dispatches on
``spec.family`` through :data:`FAMILIES`::

    family = FAMILIES[get_spec("dino_vitb8").family]
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.features.families import dinov2, dinov3, vit
from pipeline.features.families.base import BackboneSpec, Family

_VIT = vit.VitFamily()
#: ``spec.family`` -> its hooks (DINO and iBOT share the ViT of DINO).
FAMILIES: Mapping[str, Family] = {"dinov2": dinov2.Dinov2Family(), "dino": _VIT, "ibot": _VIT, "dinov3": dinov3.Dinov3Family()}


def all_specs() -> list[BackboneSpec]:
    """Every registry entry: DINOv2, DINO, iBOT, DINOv3, each family's test-sized models last."""
    return dinov2.specs() + vit.specs() + dinov3.specs()


__all__ = ["FAMILIES", "BackboneSpec", "Family", "all_specs"]
