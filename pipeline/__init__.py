"""ssvt: semantic segmentation from imperfect labels on cached, frozen DINOv2 features.

Usage: ``ssvt demo`` for the tour; ``ssvt extract`` then ``ssvt train-head`` for real work. The same
steps in Python (names are imported on first use, so ``import pipeline`` stays cheap and stage two
never loads transformers)::

    import pipeline as ssvt

    ws = ssvt.Workspace.load("ssvt.toml")
    cfg = ssvt.ExtractConfig(model="dinov2_vitl14")
    for split in ws.splits:
        ssvt.extract(ssvt.find_images(ws.data_root, split, ws.data_format), ssvt.store_path(cfg, ws.layout, split), cfg)
    store = ssvt.FeatureStore.open(ssvt.store_path(cfg, ws.layout, ws.train_split))
    labels = ssvt.ensure_labels(ws.label_source("eps"), store, num_classes=ws.num_classes)
    outcome = ssvt.train_and_evaluate(ssvt.TrainConfig(labels="eps"), ws.label_source("eps"), ws, gt=ws.labels["gt"])
    ssvt.evaluate(outcome.run_dir, ws.labels["gt"], flip_tta=True).miou
    ssvt.evaluate_runs([outcome.run_dir], ws.labels["gt"], protocol="lin", workspace=ws)[0].result.miou
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that owns it.
_API = {
    "Workspace": "pipeline.workspace",
    "ExtractConfig": "pipeline.config",
    "TrainConfig": "pipeline.config",
    "KMeansVizConfig": "pipeline.config",
    "AblateConfig": "pipeline.config",
    "find_images": "pipeline.features.data",
    "extract": "pipeline.features.extract",
    "store_path": "pipeline.features.extract",
    "FeatureStore": "pipeline.cache.store",
    "LabelSource": "pipeline.cache.label_kinds",
    "ensure_labels": "pipeline.cache.labels",
    "LabelSet": "pipeline.cache.labels",
    "train_and_evaluate": "pipeline.training.runs",
    "evaluate": "pipeline.training.evaluate",
    "evaluate_runs": "pipeline.inference.evaluate",
    "run_ablation": "pipeline.training.ablate",
    "score_labels": "pipeline.training.label_quality",
    "StoreDataset": "pipeline.training.dataset",
    "ShardShuffleSampler": "pipeline.training.dataset",
    "ShardBatchSampler": "pipeline.training.dataset",
    "predict": "pipeline.inference.predict",
    "kmeans_viz": "pipeline.figures.shape_prior",
    "register_head": "pipeline.heads",
    "register_label_kind": "pipeline.cache.label_kinds",
}
__all__ = [
    "AblateConfig", "ExtractConfig", "FeatureStore", "KMeansVizConfig", "LabelSet", "LabelSource", "ShardBatchSampler",
    "ShardShuffleSampler", "StoreDataset", "TrainConfig", "Workspace", "__version__", "ensure_labels", "evaluate",
    "evaluate_runs", "extract", "find_images", "kmeans_viz", "predict", "register_head", "register_label_kind", "run_ablation",
    "score_labels", "store_path", "train_and_evaluate",
]  # fmt: skip

if TYPE_CHECKING:
    from pipeline.cache.label_kinds import LabelSource, register_label_kind
    from pipeline.cache.labels import LabelSet, ensure_labels
    from pipeline.cache.store import FeatureStore
    from pipeline.config import AblateConfig, ExtractConfig, KMeansVizConfig, TrainConfig
    from pipeline.features.data import find_images
    from pipeline.features.extract import extract, store_path
    from pipeline.figures.shape_prior import kmeans_viz
    from pipeline.heads import register_head
    from pipeline.inference.evaluate import evaluate_runs
    from pipeline.inference.predict import predict
    from pipeline.training.ablate import run_ablation
    from pipeline.training.dataset import ShardBatchSampler, ShardShuffleSampler, StoreDataset
    from pipeline.training.evaluate import evaluate
    from pipeline.training.label_quality import score_labels
    from pipeline.training.runs import train_and_evaluate
    from pipeline.workspace import Workspace


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
