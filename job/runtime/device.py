"""The device a mode computes on, and its arithmetic, shared by every mode."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

from job.config import Config, ConfigError
from job.runtime.distributed import Topology


def pick_device(cfg: Config, topology: Topology = Topology()) -> torch.device:
    device = topology.device(cfg.train.device)
    if device.type == "cpu":
        # Exact resume needs the same arithmetic every time: deterministic kernels, and a thread
        # count that does not depend on the moment the process started.
        torch.use_deterministic_algorithms(True)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
    elif not torch.cuda.is_available():
        raise ConfigError(f"train.device: {cfg.train.device} requested but CUDA is not available")
    return device


def autocast(device: torch.device, cfg: Config) -> ContextManager:
    """bf16 autocast on CUDA when the config asks for it; CPU runs in float32 for exact resume."""
    if device.type == "cuda" and cfg.train.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
