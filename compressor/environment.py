"""The compute device a run uses, and what it ran on (device and software versions), for reports."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import transformers

import compressor
from compressor import distributed
from compressor.errors import CompressorError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise CompressorError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and distributed.active():  # distributed: one GPU per rank
        dev = torch.device("cuda", distributed.local_rank() % torch.cuda.device_count())
    return dev


def device_name(device: torch.device) -> str:
    """The GPU's or the CPU's model name, for reports: GPTQ's rounding decisions, and so its codes,
    differ between them, so a result is only reproducible on the same kind of device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return model or platform.processor() or "cpu"


def versions() -> dict:
    return {
        "compressor": compressor.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
