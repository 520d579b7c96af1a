"""Helpers the benchmark scripts share: the host's name, timing, generated inputs and fixed plans."""

from __future__ import annotations

import io
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def host_cpu() -> str:
    """The CPU this ran on: the project's machine is a virtual one whose host changes between
    days, and the peers' speed depends on it far more than byolcli's (README, Figures)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model} ({vector}, {os.cpu_count()} cores)"


def milliseconds(fn, rounds: int) -> float:
    """Median milliseconds of `fn` over `rounds` calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def build_folder(folder: Path, files: int) -> None:
    """`files` small JPEGs and PNGs in 100 subfolders, from 32 random templates."""
    from PIL import Image

    rng = np.random.default_rng(0)
    templates = []
    for i in range(32):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "PNG" if i % 16 == 0 else "JPEG", quality=90)
        templates.append((buffer.getvalue(), "png" if i % 16 == 0 else "jpg"))
    for i in range(files):
        data, ext = templates[i % len(templates)]
        sub = folder / f"d{i % 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:06d}.{ext}").write_bytes(data)


def export_random_encoder(folder: Path, image_size: int) -> Path:
    """A random-init ResNet-18 exported as a byolcli encoder: the same compute as a trained one."""
    import torch

    from byolcli.data import MEAN, STD
    from byolcli.encoder import save_encoder
    from byolcli.model import make_backbone

    torch.manual_seed(0)
    path = folder / f"encoder-{image_size}px.safetensors"
    save_encoder(make_backbone("resnet18"), path, architecture="resnet18", image_size=image_size, mean=MEAN,
                 std=STD, train_images=0, epochs=0, steps=0)
    return path


CIFAR_TRAIN = SHARED_DATA / "cifar10-5k" / "train"


def cpu_plan(images: int, precision: str, workers: int, in_memory: bool = False):
    """ResNet-18 at 32 px, batch 64, channels-last: what `byol train` plans on a CPU, fixed."""
    from byolcli.plan import Plan

    return Plan(
        device="cpu", device_name="CPU", backbone="resnet18", image_size=32, batch_size=64, accumulation=1,
        precision=precision, workers=workers, channels_last=True, images=images, skipped=0,  # as planned on CPU
        steps_per_epoch=images // 64, total_steps=10**6, epochs=0, warmup_steps=100, base_lr=0.45,
        lr=0.45 / 4, tau_base=0.99, weight_decay=1.5e-6, seed=0, step_seconds=0, time_budget=None,
        augment_on="device" if in_memory else "cpu", in_memory=in_memory,
    )
