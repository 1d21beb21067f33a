"""Installed package versions and the machine, recorded as provenance in manifests, traces and
benchmark reports."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import torch

__all__ = ["machine_info", "package_version"]


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed.

    Examples
    --------
    >>> package_version("numpy") is not None, package_version("no-such-distribution")
    (True, None)
    """
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """What a benchmark ran on: CPUs, torch threads, versions, and the compute device if given
    (with the GPU's name on CUDA).

    Examples
    --------
    >>> info = machine_info(torch.device("cpu"))
    >>> info["cpus"] == os.cpu_count(), info["device"], info["gpu"]
    (True, 'cpu', None)
    """
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "kernel": platform.release(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device is not None:
        info["device"] = str(device)
        info["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return info
