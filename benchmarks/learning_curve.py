"""Quality per epoch: train for a fixed number of epochs and score the encoder at several points.

    python benchmarks/learning_curve.py FOLDER --labels LABELS.csv --epochs 30 --at 10,20,30 \
        [--init imagenet|random|WEIGHTS --backbone resnet18] [--lr 0.45] [--tau 0.97] [--stem small|standard] \
        [--image-size 32] [--batch-size 64] [--precision bf16] [--device cuda] [--keep DIR] [--no-label-free]

Trains as `byol train FOLDER --epochs N` plans it (the same planner, recipe and schedule, with the
flags given pinned), stops at each epoch of --at to export the encoder and score it with
`byol evaluate --labels` (weighted kNN and the linear probe, and the random-init encoder of the
same network) and, unless --no-label-free, with the label-free measures of `byol train`'s report
on the trained folder (RankMe, alignment, uniformity, view retrieval), then goes on; --keep DIR
keeps each point's encoder. Epoch 0 in --at scores the start itself (--init's weights, frozen);
--lr and --tau pin the base learning rate and EMA rate the plan would choose. The schedule is the
one of the whole run, so the scores at epoch 10 of a 30-epoch curve are those of a run partway
through, not of a 10-epoch run. Each curve is written to --record
(default benchmarks/learning_curve.json) after each point, with its host, device and the training
wall time up to each point (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from common import host_cpu

from byolcli.core.encoder import load_encoder, save_encoder
from byolcli.core.files import atomic_write_text
from byolcli.core.hardware import detect_hardware
from byolcli.core.inference import pick_device
from byolcli.core.inputs import RANDOM_INIT
from byolcli.core.pixels import MEAN, STD
from byolcli.core.scan import scan
from byolcli.core.start import start_name
from byolcli.core.terminal import Reporter
from byolcli.evaluation.evaluate import evaluate_command
from byolcli.evaluation.judge import ENCODER, judge
from byolcli.training.engine import Trainer
from byolcli.training.plan import Overrides
from byolcli.training.train import plan_for
from byolcli.training.train_flags import validate

RECORD = Path(__file__).resolve().parent / "learning_curve.json"


def scores(report: dict, name: str) -> dict:
    result = report["results"][name]
    return {"knn_top1": round(result["knn"]["top1"], 4), "linear_top1": round(result["linear"]["top1"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--at", default=None, help="comma-separated epochs to score at [default: the last]")
    parser.add_argument("--init", default="random", help="imagenet, random, or a weights file")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--lr", type=float, default=None, help="base learning rate (for batch 256)")
    parser.add_argument("--tau", type=float, default=None, help="base EMA rate of the target network")
    parser.add_argument("--no-label-free", action="store_true", help="skip the label-free measures")
    parser.add_argument("--stem", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", type=Path, default=RECORD)
    parser.add_argument("--keep", type=Path, default=None, help="a folder to keep each point's encoder in")
    args = parser.parse_args()
    points = sorted({int(e) for e in args.at.split(",")}) if args.at else [args.epochs]

    manifest = scan(args.folder)
    hw = detect_hardware(args.device)
    over = validate(
        Overrides(
            epochs=args.epochs,
            init=args.init,
            backbone=args.backbone,
            lr=args.lr,
            stem=args.stem,
            image_size=args.image_size,
            batch_size=args.batch_size,
            precision=args.precision,
            device=args.device,
            seed=args.seed,
        )
    )
    plan = plan_for(manifest, hw, over)
    if args.tau is not None:
        plan.tau_base = args.tau
    print(
        f"{host_cpu()}; {hw.name}; {plan.backbone} ({plan.stem} stem) at {plan.image_size} px, batch "
        f"{plan.batch_size}, {plan.precision}, {plan.total_steps:,} steps, "
        f"base lr {plan.base_lr}, tau {plan.tau_base}, warm-up {plan.warmup_steps} steps, from {start_name(plan.init)}",
        flush=True,
    )
    paths = manifest.absolute_paths()
    trainer = Trainer(plan, paths)
    curve, trained_seconds, quiet = [], 0.0, Reporter(quiet=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory() as scratch:
        encoder = Path(scratch) / "encoder.safetensors"
        for epoch in points:
            start = time.perf_counter()
            trainer.run(min(plan.total_steps, epoch * plan.steps_per_epoch))
            trained_seconds += time.perf_counter() - start
            save_encoder(
                trainer.model.online_encoder,
                encoder,
                architecture=plan.backbone,
                image_size=plan.image_size,
                mean=MEAN,
                std=STD,
                train_images=plan.images,
                epochs=epoch,
                steps=trainer.step,
                init=start_name(plan.init),
                init_path=plan.init if plan.init not in (None, "imagenet") else "",
            )
            report = evaluate_command(args.labels, reporter=quiet, model=encoder, device=args.device)
            unlabelled = {ENCODER: None, RANDOM_INIT: None}
            if not args.no_label_free:
                device = pick_device(args.device)
                unlabelled = judge(paths, load_encoder(encoder, device), device, seed=args.seed).measures
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(encoder, args.keep / f"epoch{epoch}.safetensors")
            point = {
                "epoch": epoch,
                "steps": trainer.step,
                "train_seconds": round(trained_seconds, 1),
                "images_per_second": round(trainer.step * plan.effective_batch / trained_seconds, 1),
                **scores(report, "encoder"),
                "label_free": unlabelled[ENCODER],
                "random_init": {**scores(report, RANDOM_INIT), "label_free": unlabelled.get(RANDOM_INIT)},
            }
            curve.append(point)
            print(json.dumps(point), flush=True)
            record(args, plan, hw, curve, started)


def record(args, plan, hw, curve: list, started: str) -> None:
    """Write the curve so far into --record, replacing this run's earlier entry: a run stopped
    before its last point keeps the points it reached."""
    entry = {
        "date": started,
        "host": host_cpu(),
        "device": hw.name,
        "folder": f"{args.folder.resolve().parent.name}/{args.folder.name}",
        "labels": args.labels.name,
        "backbone": plan.backbone,
        "stem": plan.stem,
        "image_size": plan.image_size,
        "batch_size": plan.effective_batch,
        "precision": plan.precision,
        "epochs": args.epochs,
        "init": start_name(plan.init),
        "base_lr": plan.base_lr,
        "tau_base": plan.tau_base,
        "warmup_steps": plan.warmup_steps,
        "seed": args.seed,
        "curve": curve,
    }
    history = json.loads(args.record.read_text()) if args.record.exists() else []
    history = [e for e in history if e["date"] != started]
    atomic_write_text(args.record, json.dumps([*history, entry], indent=1) + "\n")


if __name__ == "__main__":
    main()
