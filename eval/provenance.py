"""What an evaluation ran on: library versions and hardware, recorded in every report.

Why: answers of the same weights change with the library versions (generation defaults, image
processors, kernels) and with the hardware (bf16 on a GPU vs fp32 on a CPU), so a number without
them cannot be compared or reproduced.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("torch", "transformers", "peft", "deepspeed")
CPUINFO = Path("/proc/cpuinfo")


def library_version(name: str) -> str | None:
    """The installed distribution's version, read without importing it (None when not installed)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what `platform` knows)."""
    if CPUINFO.is_file():
        for line in CPUINFO.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def gpu_names() -> list[str]:
    """Names of the visible CUDA devices; empty without a GPU."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def environment() -> dict:
    """Python and library versions, CPU model and count, GPU names (or "none")."""
    gpus = gpu_names()
    return {
        "python": platform.python_version(),
        "libraries": {name: library_version(name) for name in LIBRARIES},
        "platform": platform.platform(),
        "cpu": {"model": cpu_model(), "count": os.cpu_count()},
        "gpu": gpus or "none",
    }
