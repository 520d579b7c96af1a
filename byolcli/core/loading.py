"""How this machine loads images and computes: the precision a device computes fastest, the loader
processes for training and for embedding, and how many of them fit in /dev/shm. Training's plan and
embedding both follow these rules."""

from __future__ import annotations

from byolcli.core.hardware import Hardware

LOADER_PREFETCH = 4  # batches each loader process prepares ahead (the DataLoader's prefetch_factor)
SHARED_MEMORY_SHARE = 0.8  # loader processes may fill at most this share of /dev/shm


def device_precision(hw: Hardware) -> tuple[str, str]:
    """The precision a device computes fastest and safely, without timing it."""
    if hw.kind == "cuda":
        return ("bf16", "GPU computes bf16 natively") if hw.bf16 else ("fp16", "GPU lacks bf16; fp16 with loss scaling")
    if hw.kind == "cpu" and hw.bf16:
        return "bf16", "CPU has AVX512-BF16/AMX"
    if hw.kind == "cpu":
        return "fp32", "CPU lacks native bf16 (emulated, it is slower than fp32)"
    return "fp32", "autocast on MPS is not reliable enough for training yet"


def choose_workers(hw: Hardware, embedding: bool = False) -> tuple[int, str]:
    """Loader processes for training, or for embedding: on a CPU the forward pass of an embedding is
    cheap beside a training step, so more cores decode."""
    if hw.kind == "cpu" and embedding:
        return max(1, hw.cores // 2), f"{hw.cores} cores: half decode, half embed"
    if hw.kind == "cpu":
        if hw.cores <= 2:
            return 0, "with 2 cores, a loader process only competes with the training threads"
        return hw.cores // 4, f"{hw.cores} cores: a quarter decode, the rest train"
    workers = max(1, min(hw.cores - 1, 12))
    return workers, f"{hw.cores} cores, one left for the training process"


def fit_workers_to_shared_memory(workers: int, held: int, free: int, why: str) -> tuple[int, str]:
    """Fewer loader processes when what each holds in /dev/shm (`held` bytes; `free` there) would
    not fit (a container's default is 64 MiB): past it, a loader process dies of a bus error
    mid-run. Returns (workers, why), keeping the given reason when nothing had to change."""
    if workers == 0 or free == 0:
        return workers, why
    fitting = min(workers, int(SHARED_MEMORY_SHARE * free // held))
    if fitting == workers:
        return workers, why
    return fitting, (
        f"/dev/shm has {free / 2**20:,.0f} MiB free and each loader process holds "
        f"{held / 2**20:,.0f} MiB there: {fitting} of {workers} (a larger /dev/shm, e.g. "
        "docker run --shm-size 8g, allows more)"
    )
