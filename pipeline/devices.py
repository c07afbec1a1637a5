"""Device and precision policy, shared by both stages: which device, which autocast, what fits in memory.

Usage::

    device = pick_device("auto")                 # cuda when torch sees a GPU, else cpu
    with torch.inference_mode(), autocast(device):
        tokens = model(pixels.to(device))
    fits_in_memory(nbytes, device)               # keep features on the device, or stream them

Nothing here imports a model library, so training a head never loads transformers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


def pick_device(spec: str) -> torch.device:
    """ "auto" -> the first CUDA device when there is one, else the CPU; "cpu", "cuda", "cuda:1" as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec} asked for, but torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
    return device


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype :func:`autocast` computes in on ``device``: bf16 or fp16 on CUDA, None (fp32) elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA GPUs that support it, fp16 on older ones, plain fp32 on the CPU."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def pin_memory(device: torch.device) -> bool:
    """Whether host batches should be pinned for ``device`` (only worth it for CUDA copies)."""
    return device.type == "cuda"


def fits_in_memory(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` of features can live in GPU memory (CUDA) or RAM, with room to spare."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes < 0.6 * free
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not on Linux: be conservative
        available = 8 * 2**30
    return nbytes < 0.5 * available


class OomBackoff:
    """Runs a function over a batch in chunks and halves the chunk on CUDA out-of-memory, keeping
    the smaller chunk for later calls (the extract engine and the protocol evaluation share it)."""

    def __init__(self, chunk: int) -> None:
        self.chunk = max(1, chunk)

    def __call__(self, fn: Callable[[torch.Tensor], T], batch: torch.Tensor) -> list[T]:
        while True:
            try:
                return [fn(batch[i : i + self.chunk]) for i in range(0, len(batch), self.chunk)]
            except torch.cuda.OutOfMemoryError:
                if self.chunk == 1:
                    raise
                self.chunk //= 2
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory; retrying with batches of %d", self.chunk)
