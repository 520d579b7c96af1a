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
    days, and the peers' speed depends on it far more than byolcli's (benchmarks/README.md)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
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

    from byolcli.core.backbones import make_backbone
    from byolcli.core.encoder import save_encoder
    from byolcli.core.pixels import MEAN, STD

    torch.manual_seed(0)
    path = folder / f"encoder-{image_size}px.safetensors"
    save_encoder(
        make_backbone("resnet18"),
        path,
        architecture="resnet18",
        image_size=image_size,
        mean=MEAN,
        std=STD,
        train_images=0,
        epochs=0,
        steps=0,
    )
    return path


CIFAR_TRAIN = SHARED_DATA / "cifar10-5k" / "train"


def cpu_plan(images: int, precision: str, workers: int, in_memory: bool = False):
    """ResNet-18 at 32 px, batch 64, channels-last: what `byol train` plans on a CPU, fixed."""
    from byolcli.training.plan import Plan

    return Plan(
        device="cpu",
        device_name="CPU",
        backbone="resnet18",
        image_size=32,
        batch_size=64,
        accumulation=1,
        precision=precision,
        workers=workers,
        channels_last=True,
        images=images,
        skipped=0,  # as planned on CPU
        steps_per_epoch=images // 64,
        total_steps=10**6,
        epochs=0,
        warmup_steps=100,
        base_lr=0.45,
        lr=0.45 / 4,
        tau_base=0.99,
        weight_decay=1.5e-6,
        seed=0,
        step_seconds=0,
        time_budget=None,
        augment_on="device" if in_memory else "cpu",
        in_memory=in_memory,
    )


# --- tables of stored results (benchmarks/tables.py writes them into benchmarks/README.md) ---------------

PEERS = ("lightly", "byol-pytorch")


def peers_tables(results: dict) -> str:
    """Markdown: each host's throughput round by round, then kNN by training budget."""
    parts = []
    for host, measured in results.get("throughput_by_host", {}).items():
        systems = measured["systems"]
        fastest_peer = max(systems[p]["median"] for p in PEERS if p in systems)
        rows = [
            f"**{host}** ({measured['date']}), training images/s:",
            "",
            "| system | rounds | median | × the faster peer |",
            "|---|---|---|---|",
        ]
        for name, value in systems.items():
            ratio = "" if name in PEERS else f"{value['median'] / fastest_peer:.2f}×"
            rounds = ", ".join(f"{r:.1f}" for r in value["runs"])
            rows.append(f"| {name} | {rounds} | {value['median']:.1f} | {ratio} |")
        parts.append("\n".join(rows))
    runs = results.get("quality", {})
    budgets = sorted({r["minutes"] for r in runs.values()})
    systems = sorted({r["system"] for r in runs.values()}, key=lambda s: (not s.startswith("byolcli"), s))
    rows = [
        "kNN top-1 on the cifar10-5k test split by wall-clock training budget (optimizer steps in brackets; "
        "host where recorded):",
        "",
        "| system |" + "".join(f" {m:g} min |" for m in budgets),
        "|---" * (1 + len(budgets)) + "|",
    ]
    for system in systems:
        cells = []
        for m in budgets:
            run = runs.get(f"{system}@{m:g}")
            host = f", {run['host']}" if run and run.get("host") else ""
            cells.append(f"{run['knn_top1']:.1%} ({run['steps']:,}{host})" if run else "–")
        rows.append(f"| {system} |" + "".join(f" {c} |" for c in cells))
    for name, value in results.get("baselines", {}).items():
        rows.append(f"| {name}, no training |" + "".join(f" {value:.1%} |" for _ in budgets))
    parts.append("\n".join(rows))
    return "\n\n".join(parts)


def learning_curve_table(curves: list[dict]) -> str:
    """Markdown: each recorded curve's scores at its points, next to the random-init network's. Epoch 0
    is the start, frozen; curves recorded before starts and pinned rates were recorded show "random" and "plan"."""
    rows = [
        "| data | start | base lr, τ | stem | size | batch | precision | host, device | epoch | kNN top-1 | "
        "linear top-1 | random init kNN / linear | training time | images/s |",
        "|---" * 14 + "|",
    ]
    for c in curves:
        start = c.get("init", "random").split(" sha256:")[0]
        rates = f"{c['base_lr']}, {c['tau_base']}" if "base_lr" in c else "plan"
        for p in c["curve"]:
            rows.append(
                f"| {c['folder']} | {start} | {rates} | {c['stem']} | {c['image_size']} px | {c['batch_size']} | "
                f"{c['precision']} | {c['host']}, {c['device']} | {p['epoch']} | {p['knn_top1']:.1%} | "
                f"{p['linear_top1']:.1%} | {p['random_init']['knn_top1']:.1%} / "
                f"{p['random_init']['linear_top1']:.1%} | {p['train_seconds'] / 60:.1f} min | "
                f"{p['images_per_second']:.0f} |"
            )
    return "\n".join(rows)


def label_free_table(curves: list[dict]) -> str:
    """Markdown: the label-free measures beside kNN and the linear probe, for the curves that recorded
    them, with the random-init network as each curve's first row."""
    rows = [
        "| data | stem | size | host | epoch of | kNN top-1 | linear top-1 | RankMe | alignment ↓ | uniformity ↓ "
        "| view retrieval |",
        "|---" * 11 + "|",
    ]

    def row(c: dict, when: str, scores: dict) -> str:
        measures = scores["label_free"]
        return (
            f"| {c['folder']} | {c['stem']} | {c['image_size']} px | {c['host']} | {when} | "
            f"{scores['knn_top1']:.1%} | {scores['linear_top1']:.1%} | {measures['rankme']:.1f} | "
            f"{measures['alignment']:.3f} | {measures['uniformity']:.3f} | {measures['view_retrieval']:.1%} |"
        )

    for c in curves:
        points = [p for p in c["curve"] if p.get("label_free")]
        if points:
            rows.append(row(c, "random init", points[0]["random_init"]))
            rows += [row(c, f"{p['epoch']} / {c['epochs']}", p) for p in points]
    return "\n".join(rows)
