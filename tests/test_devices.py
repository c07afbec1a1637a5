"""The device and precision policy, and that stage two runs without the model libraries of stage one."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pipeline.devices import autocast, fits_in_memory, pick_device, pin_memory
from pipeline.errors import ConfigError


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="is not a device"):
        pick_device("tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            pick_device("cuda")


def test_cpu_runs_in_full_precision_and_pins_nothing():
    cpu = torch.device("cpu")
    assert isinstance(autocast(cpu), contextlib.nullcontext)
    with autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert not pin_memory(cpu)
    assert pin_memory(torch.device("cuda", 0))


def test_fits_in_memory_on_the_cpu():
    assert fits_in_memory(1, torch.device("cpu"))
    assert not fits_in_memory(2**62, torch.device("cpu"))


def test_training_and_evaluation_do_not_import_transformers(modules_loaded_by):
    """A fresh interpreter: importing stage two (and the package's public names for it) loads neither
    transformers nor the feature extractor; the check can fail, since stage one loads both."""
    stage_two = (
        "import pipeline, pipeline.training.train, pipeline.training.evaluate, pipeline.training.runs\n"
        "pipeline.train_and_evaluate, pipeline.evaluate, pipeline.FeatureStore, pipeline.ensure_labels"
    )
    assert modules_loaded_by(stage_two, "transformers", "pipeline.features") == []
    assert "transformers" in modules_loaded_by("import pipeline.features.extract", "transformers")
