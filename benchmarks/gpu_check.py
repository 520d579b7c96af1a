"""The one prepared device check, for a lent CUDA machine: every figure byolcli still owes a GPU.

    python benchmarks/gpu_check.py --out DIR [--data benchmarks/data] [--smoke]

Installs nothing. Each part runs in its own process with its own time limit, so one that
crashes or hangs costs only itself; whatever each measured goes into DIR/gpu_check.json
(rewritten after every part) and is printed. The parts:

- environment: GPU, memory, compute capability, torch and CUDA versions;
- quality: `byol train cifar10-5k/train --time 3m` with the automatic plan (the plan, no
  out-of-memory, images/s and data wait: ResNet-18 at 32 px from a JPEG folder), then
  `byol embed` and `byol evaluate --labels cifar10-5k/labels.csv`: kNN and linear top-1
  against the random-init encoder;
- resnet50: ResNet-50 at 224 px from generated photo-sized JPEGs: images/s and data wait;
- loader_fp16: loader processes making the views (--augment-on cpu) in fp16;
- resident: images kept in page-locked CPU memory for the GPU instead of in its memory, and
  host syncs per training step counted by torch.cuda.set_sync_debug_mode("warn");
- probe: the batch the probe chose for ResNet-50 at 224 px against the largest that fits;
- augment: the batched augmentation's share of a ResNet-50 step at 224 px (views made on the
  GPU against views given ready, and the views alone);
- embedding: byolcli's pipeline against the plain torchvision one (embed_throughput.py);
- sync_batchnorm: two processes with synchronised batch norm, where there are two GPUs.

DATA must hold cifar10-5k (copy ../shared/data/cifar10-5k there: benchmarks/data is
ignored by git and travels with the checkout). --smoke runs every part for seconds on
whatever device there is, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUDGET = 8 * 60  # seconds for the whole check
PARTS = (
    "environment",
    "quality",
    "resnet50",
    "loader_fp16",
    "resident",
    "probe",
    "augment",
    "embedding",
    "sync_batchnorm",
)


def byol(*args, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "byolcli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def run_figures(run: Path) -> dict:
    plan = json.loads((run / "plan.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = rows[2:] or rows  # past start-up
    keys = (
        "device_name",
        "backbone",
        "image_size",
        "batch_size",
        "accumulation",
        "precision",
        "workers",
        "in_memory",
        "augment_on",
        "total_steps",
        "epochs",
    )
    return {
        "plan": {k: plan[k] for k in keys},
        "images_per_s": statistics.median(r["images_per_s"] for r in rows) if rows else None,
        "data_wait": statistics.median(r["data_wait"] for r in rows) if rows else None,
    }


def trained(args, run: Path, folder: Path, seconds: str, *flags) -> dict:
    result = byol("train", folder, "--time", seconds, "--out", run, *flags, *args.device_flag, timeout=args.limit)
    figures = {"exit_code": result.returncode, "out_of_memory": "out of memory" in result.stderr.lower()}
    if result.returncode:
        figures["stderr_tail"] = result.stderr[-1500:]
    if (run / "metrics.jsonl").exists():
        figures.update(run_figures(run))
    return figures


# --- the parts ---------------------------------------------------------------------------------


def environment(args) -> dict:
    import torch

    figures = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_cores": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(
            gpu=props.name,
            gpus=torch.cuda.device_count(),
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=list(torch.cuda.get_device_capability(0)),
        )
    return figures


def quality(args) -> dict:
    cifar = args.data / "cifar10-5k"
    run = args.out / "runs" / "cifar"
    figures = trained(args, run, cifar / "train", args.seconds(180))
    vectors = args.out / "runs" / "cifar-test.npy"
    start = time.perf_counter()
    embedded = byol(
        "embed",
        cifar / "test",
        "--out",
        vectors,
        "--model",
        run / "encoder.safetensors",
        *args.device_flag,
        timeout=args.limit,
    )
    figures["embed"] = {"exit_code": embedded.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if embedded.returncode:
        figures["embed"]["stderr_tail"] = embedded.stderr[-500:]
    scores = args.out / "runs" / "cifar-scores.json"
    evaluated = byol(
        "evaluate",
        "--labels",
        cifar / "labels.csv",
        "--model",
        run / "encoder.safetensors",
        "--json",
        scores,
        *args.device_flag,
        timeout=args.limit,
    )
    figures["evaluate_exit_code"] = evaluated.returncode
    if scores.exists():
        results = json.loads(scores.read_text())["results"]
        figures["top1"] = {
            name: {"knn": r["knn"]["top1"], "linear": r["linear"]["top1"]} for name, r in results.items()
        }
    return figures


def resnet50(args) -> dict:
    photos = args.out / "photos"
    if not photos.is_dir():
        subprocess.run(
            [sys.executable, str(HERE / "make_images.py"), str(photos), "--count", str(args.photos)],
            check=True,
            timeout=args.limit,
        )
    return trained(
        args,
        args.out / "runs" / "resnet50",
        photos,
        args.seconds(60),
        "--backbone",
        "resnet50",
        "--image-size",
        "224" if not args.smoke else "64",
    )


def loader_fp16(args) -> dict:
    precision = ("--precision", "fp16") if not args.smoke else ()
    return trained(
        args,
        args.out / "runs" / "loader-fp16",
        args.data / "cifar10-5k" / "train",
        args.seconds(25),
        "--augment-on",
        "cpu",
        *precision,
    )


def resident(args) -> dict:
    """In this process: a Trainer whose decoded images stay in CPU memory, and its host syncs."""
    import warnings

    import torch

    from byolcli.core.scan import scan
    from byolcli.training import engine
    from byolcli.training.plan import Plan

    paths = scan(args.data / "cifar10-5k" / "train").absolute_paths()
    cuda = torch.cuda.is_available()
    plan = Plan(
        device="cuda:0" if cuda else "cpu",
        device_name="",
        backbone="resnet18",
        image_size=32,
        batch_size=256 if cuda else 16,
        accumulation=1,
        precision="bf16" if cuda else "fp32",
        workers=4,
        channels_last=True,
        images=len(paths),
        skipped=0,
        steps_per_epoch=len(paths) // (256 if cuda else 16),
        total_steps=1000,
        epochs=1,
        warmup_steps=10,
        base_lr=0.45,
        lr=0.45,
        tau_base=0.99,
        weight_decay=1.5e-6,
        seed=0,
        step_seconds=0.05,
        time_budget=None,
        augment_on="device",
        in_memory=True,
    )
    figures = {}
    for kept in ("cpu", "gpu"):
        engine.fits_on_gpu = lambda device, nbytes, kept=kept: kept == "gpu"
        trainer = engine.Trainer(plan, paths)
        records = []
        steps = 60 if not args.smoke else 4
        trainer.run(steps, on_log=records.append, log_every=2.0 if not args.smoke else 0.0)
        later = records[1:] or records
        figures[f"images_in_{kept}_memory"] = {
            "images_per_s": statistics.median(r["images_per_s"] for r in later),
            "data_wait": statistics.median(r["data_wait"] for r in later),
        }
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.run(trainer.step + 3, log_every=3600.0)  # three steps and the closing meeting
        torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        figures["host_syncs_in_3_steps_and_a_log"] = {"count": len(syncs), "first": sorted(set(syncs))[:5]}
    return figures


def probe(args) -> dict:
    """The probe's choice for ResNet-50 at 224 px against the largest batch that runs."""
    from byolcli.core.hardware import detect_hardware
    from byolcli.training.probe import OutOfMemory, StepSetting, probe_step
    from byolcli.training.rules import MAX_BATCH

    chosen_run = args.out / "runs" / "resnet50" / "plan.json"
    if not chosen_run.exists():
        return {"skipped": "the resnet50 part wrote no plan"}
    plan = json.loads(chosen_run.read_text())
    hw = detect_hardware(plan["device"])
    batch, largest = plan["batch_size"], plan["batch_size"]
    for factor in (1.25, 1.5, 2, 2.5, 3, 4):
        trial = int(plan["batch_size"] * factor)
        setting = StepSetting(
            plan["backbone"],
            plan["image_size"],
            trial,
            plan["precision"],
            plan["channels_last"],
            plan.get("stem", "standard"),
            plan["augment_on"],
        )
        try:
            probe_step(hw, setting, steps=1)
        except OutOfMemory:
            break
        largest = trial
    return {
        "chosen": batch,
        "largest_that_runs": largest,
        "ratio": round(batch / largest, 3),
        "capped_at_max_batch": batch == MAX_BATCH,
    }


def augment(args) -> dict:
    """What making both views on the device costs in a ResNet-50 step at 224 px: the step with its
    views made from canvases, the step given ready views, and the views alone."""
    import torch

    from byolcli.core.hardware import detect_hardware, synchronize
    from byolcli.core.pixels import canvas_side
    from byolcli.training.augment import byol_views
    from byolcli.training.probe import StepSetting, probe_step

    hw = detect_hardware("cpu" if args.smoke else None)
    backbone, size, batch = ("resnet18", 32, 8) if args.smoke else ("resnet50", 224, 128)
    precision = "bf16" if hw.kind == "cuda" and hw.bf16 else "fp32"
    step = {
        where: probe_step(hw, StepSetting(backbone, size, batch, precision, True, augment_on=where), steps=3)
        for where in ("device", "cpu")  # "cpu": the probe's views come ready
    }
    device, canvas = torch.device(hw.device), canvas_side(size)
    canvases = torch.randint(0, 256, (batch, 3, canvas, canvas), dtype=torch.uint8, device=device)
    sizes = torch.full((batch, 2), canvas, device=device)
    timings = []
    for _ in range(6):
        start = time.perf_counter()
        byol_views(canvases, sizes, size)
        synchronize(device)
        timings.append(time.perf_counter() - start)
    views = statistics.median(timings[1:])
    return {
        "backbone": backbone,
        "image_size": size,
        "batch": batch,
        "precision": precision,
        "step_with_views_s": round(step["device"], 4),
        "step_given_views_s": round(step["cpu"], 4),
        "views_alone_s": round(views, 4),
        "views_share_of_step": round(views / step["device"], 3),
    }


def embedding(args) -> dict:
    model = args.out / "runs" / "cifar" / "encoder.safetensors"
    command = [
        sys.executable,
        str(HERE / "embed_throughput.py"),
        str(args.data / "cifar10-5k" / "test"),
        "--rounds",
        "2" if not args.smoke else "1",
    ] + (["--model", str(model)] if model.exists() else [])
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=args.limit,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    return {"exit_code": done.returncode, "report": done.stdout.strip().splitlines(), "stderr_tail": done.stderr[-500:]}


def sync_batchnorm(args) -> dict:
    import torch

    if torch.cuda.device_count() < 2:
        return {"skipped": "one GPU: synchronised batch norm needs two processes on two GPUs"}
    return trained(
        args,
        args.out / "runs" / "sync-bn",
        args.data / "cifar10-5k" / "train",
        args.seconds(30),
        "--gpus",
        "2",
        "--batch-size",
        "64",
    )


# --- the driver --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--part", choices=PARTS)
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.data = args.data.resolve()
    args.device_flag = ("--device", "cpu") if args.smoke else ()
    args.seconds = (lambda s: "8s") if args.smoke else (lambda s: f"{s}s")
    args.photos = 64 if args.smoke else 6000
    args.limit = 400
    if args.part:  # one part, in this process: its figures as the last line
        print(json.dumps(globals()[args.part](args)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    report, started = {}, time.monotonic()
    for part in PARTS:
        part_started = time.monotonic()
        left = BUDGET - (part_started - started)
        if left < 20:
            report[part] = {"skipped": "out of time"}
            continue
        command = [sys.executable, __file__, "--part", part, "--out", str(args.out), "--data", str(args.data)]
        try:
            done = subprocess.run(
                command + (["--smoke"] if args.smoke else []),
                capture_output=True,
                text=True,
                timeout=left,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
            )
            lines = done.stdout.strip().splitlines()
            report[part] = (
                json.loads(lines[-1])
                if done.returncode == 0 and lines
                else {"failed": done.returncode, "stderr_tail": done.stderr[-2000:]}
            )
        except subprocess.TimeoutExpired:
            report[part] = {"failed": "timed out"}
        report[part]["seconds"] = round(time.monotonic() - part_started, 1)
        print(f"== {part}: {json.dumps(report[part])[:2000]}", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
