"""What this process may use: the device (CUDA GPU, Apple MPS or CPU), its memory and precision,
the CPU cores and shared memory; and the few device calls that differ between CUDA, MPS and CPU.
Both the planner and `byol embed` ask here."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `byol --help` and the planner stay light
    import torch

import contextlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from byolcli.core.errors import UserError

GiB = 1024**3


CGROUP = Path("/sys/fs/cgroup")  # a container's limits: v2 files at its root, v1 files under cpu/ and memory/


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
    """The cores this process may run on: its CPU affinity, the container's CPU quota and, where it is
    set, OMP_NUM_THREADS (how a scheduler or the user shares the machine between processes); not the
    machine's count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    with contextlib.suppress(ValueError):
        cores = min(cores, int(os.environ.get("OMP_NUM_THREADS", "")))
    return max(1, cores)


def _cgroup_cpu_quota() -> float | None:
    """Cores' worth of CPU time the container may use (v2 cpu.max, else v1's CFS quota); None for no limit."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = _read(CGROUP / "cpu.max").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        cfs_quota = int(_read(CGROUP / "cpu" / "cpu.cfs_quota_us"))
        return None if cfs_quota <= 0 else cfs_quota / int(_read(CGROUP / "cpu" / "cpu.cfs_period_us"))
    return None


def _cgroup_memory_limit() -> int | None:
    """The container's memory limit in bytes (v2 memory.max, else v1's limit_in_bytes); None for none."""
    for path in (CGROUP / "memory.max", CGROUP / "memory" / "memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            text = _read(path)
            return None if text == "max" else int(text)
    return None


def _read(path: Path) -> str:
    return path.read_text().strip()


def free_shared_memory() -> int:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return 0


def system_memory() -> int:
    """Bytes of memory this process may count on: the machine's, or the container's limit if lower
    (past it the container is killed, however much the machine has)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        physical = 0
    limit = _cgroup_memory_limit()
    return physical if limit is None or not physical else min(physical, limit)


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


def precision_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast computes `precision` in; None for fp32, which never enters autocast."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def mixed_precision(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """torch.autocast for `dtype`, or no context at all for fp32 (dtype None): torch 2.4 raises on
    torch.autocast("mps", enabled=False) rather than doing nothing."""
    import torch

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def use_device(device: torch.device, precision: str) -> None:
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
# RuntimeError saying "out of memory" too). cuDNN reports an internal error when it cannot load its
# kernels into a full GPU (pytorch/pytorch#81620); its execution failures are faults, not memory.
OUT_OF_MEMORY = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn_status_internal_error",
)


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(sign in text for sign in OUT_OF_MEMORY)


def memory_held(device: torch.device) -> int:
    """Bytes the step kept from the rest of the device: on CUDA what the allocator reserved at its
    peak (what it allocated, plus the cache it cannot hand out elsewhere); on MPS what the driver
    holds, since unified memory swaps instead of failing when it runs short."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    return 0


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, copied without waiting only from page-locked memory to CUDA: MPS does
    not wait for a non-blocking copy from ordinary memory, whose source may be freed before it is read."""
    return tensor.to(device, non_blocking=device.type == "cuda" and tensor.is_pinned())


def release_cached_memory(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
