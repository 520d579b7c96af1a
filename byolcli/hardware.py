"""What this process may use: the device (CUDA GPU, Apple MPS or CPU), its memory and precision,
the CPU cores and shared memory; and the few device calls that differ between CUDA, MPS and CPU.
Both the planner and `byol embed` ask here."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from byolcli.errors import UserError

GiB = 1024**3


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # a container's CPU quota: "max" or "QUOTA PERIOD"


@dataclass(frozen=True)
class Hardware:
    kind: str  # "cuda", "mps" or "cpu"
    name: str
    total_memory: int  # bytes: device memory, or system RAM on CPU
    free_memory: int
    bf16: bool
    cores: int
    device: str  # the torch device string, e.g. "cuda:0"
    ram: int = 0  # bytes of system memory this process may count on (0: unknown)
    shared_memory: int = 0  # free bytes in /dev/shm, where loader processes hand over batches (0: unknown)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, and the container's CPU quota
    (cgroup v2 cpu.max), not the machine's count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def free_shared_memory() -> int:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return 0


def system_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_bf16(index: int) -> bool:
    """Whether CUDA device `index` computes bf16 natively: compute capability 8.0 (Ampere) or newer.
    torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (T4, V100, P100),
    far slower than fp16 there, and asks about the current device rather than this one."""
    import torch

    return torch.cuda.get_device_capability(index) >= (8, 0)


def detect_hardware(device: str | None = None) -> Hardware:
    import torch

    cores = usable_cores()
    shm = free_shared_memory()
    wanted = (device or "").lower()
    if wanted.startswith("cuda") or (not wanted and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here")
        index = int(wanted.split(":")[1]) if ":" in wanted else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        free, total = torch.cuda.mem_get_info(index)
        props = torch.cuda.get_device_properties(index)
        return Hardware(
            "cuda", props.name, total, free, cuda_has_bf16(index), cores, f"cuda:{index}", system_memory(), shm
        )
    if wanted == "mps" or (not wanted and torch.backends.mps.is_available()):
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: Apple MPS is not available here")
        total = int(torch.mps.recommended_max_memory())
        free = total - int(torch.mps.driver_allocated_memory())
        return Hardware("mps", "Apple GPU (MPS)", total, free, False, cores, "mps", system_memory(), shm)
    if wanted not in ("", "cpu"):
        raise UserError(f"--device {device}: unknown device (use cuda, cuda:N, mps or cpu)")
    total = system_memory()
    return Hardware("cpu", f"CPU ({cores} cores)", total, total, cpu_has_bf16(), cores, "cpu", total, shm)


def mixed_precision(device_type: str, dtype):
    """torch.autocast for `dtype`, or no context at all for fp32 (dtype None): torch 2.4 raises on
    torch.autocast("mps", enabled=False) rather than doing nothing."""
    import torch

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def use_device(device, precision: str) -> None:
    """Make `device` the current CUDA device (pinned-memory threads, cuDNN handles and memory
    checks otherwise use GPU 0), and keep fp32 exact there: cuDNN's convolutions use TF32 on
    Ampere and newer unless told not to."""
    import torch

    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    if precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


# How an allocation failure reads: torch's own, and those of the libraries it calls (MPS raises a plain
# RuntimeError saying "out of memory" too).
OUT_OF_MEMORY = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn_status_internal_error",
    "cudnn_status_execution_failed",
)


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(sign in text for sign in OUT_OF_MEMORY)


def memory_held(device) -> int:
    """Bytes the step kept from the rest of the device: on CUDA what the allocator reserved at its
    peak (what it allocated, plus the cache it cannot hand out elsewhere); on MPS what the driver
    holds, since unified memory swaps instead of failing when it runs short."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    return 0


def release_cached_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
