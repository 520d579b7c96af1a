"""Helpers the benchmark scripts share."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def host_cpu() -> str:
    """The CPU this ran on: the project's machine is a virtual one whose host changes between
    days, and the peers' speed depends on it far more than byolcli's (README, Figures)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model} ({vector}, {os.cpu_count()} cores)"
