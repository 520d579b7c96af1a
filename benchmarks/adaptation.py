"""How far to move from the starting weights: one run of `byol train --init WEIGHTS` as it plans, scored
at several points and at several mixes between the start and the adapted encoder.

    python benchmarks/adaptation.py SET --init WEIGHTS --backbone resnet18 [--epochs 20] [--at 1,5,10,20] \
        [--mix 0.5,1] [--final-mix 0.25,0.75] [--record benchmarks/adaptation.jsonl] [--baselines-only]

SET is a shared set's folder (SET/train is trained on, SET/labels.csv scores with its split column). At each
epoch of --at the online encoder is mixed with the start, θ = start + m·(adapted − start), for each m of
--mix (and --final-mix at the last point), every weight and batch-norm statistic alike; each mix is scored as
`byol evaluate --labels` scores an encoder (weighted kNN and the linear probe, train rows fit, test rows
score), as `byol train --labels` scores a candidate on the train rows alone (its choose part: *_choose), and,
for --mix, with the label-free measures of `byol train`'s report on a seeded sample of SET/train (with
--recalibrate, on the mixes with measured statistics only, the kind the plan exports). The
start itself (m = 0) is scored at the run's size and at 32 px, and a random-init network (network: random
init). One JSON line per scored encoder goes to --record as it is measured, with the host and the training
seconds so far (scoring excluded).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import host_cpu

from byolcli.core.encoder import load_encoder, save_encoder
from byolcli.core.hardware import detect_hardware
from byolcli.core.inference import embed_paths, pick_device
from byolcli.core.labels import read_labels
from byolcli.core.pixels import MEAN, STD
from byolcli.core.scan import scan
from byolcli.core.start import random_init_network, start_name
from byolcli.evaluation.evaluate import make_protocol, score
from byolcli.evaluation.judge import sample_paths, view_embeddings
from byolcli.evaluation.label_free import alignment, rankme, uniformity, view_retrieval
from byolcli.training.candidates import mixed_encoder, recalibrated, score_candidates
from byolcli.training.engine import Trainer
from byolcli.training.plan import Overrides
from byolcli.training.train import plan_for
from byolcli.training.train_flags import validate

RECORD = Path(__file__).resolve().parent / "adaptation.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("set", type=Path)
    parser.add_argument("--init", required=True)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--epochs", type=int, default=None, help="[default: the plan's]")
    parser.add_argument("--at", default=None, help="epochs to score at [default: the last]")
    parser.add_argument("--mix", default="0.5,1")
    parser.add_argument("--final-mix", default="0.25,0.75", help="more mixes at the last point, labels only")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (order, views, heads)")
    parser.add_argument("--record", type=Path, default=RECORD)
    parser.add_argument("--tag", default="")
    parser.add_argument("--baselines-only", action="store_true", help="score the start and random init, no training")
    parser.add_argument("--no-baselines", action="store_true", help="score no start or random init (already recorded)")
    parser.add_argument("--no-label-free", action="store_true", help="labels only")
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="also score each mix with batch-norm statistics measured on SET/train",
    )
    args = parser.parse_args()

    folder, labels = args.set / "train", args.set / "labels.csv"
    manifest = scan(folder)
    hw = detect_hardware(None)
    over = validate(Overrides(epochs=args.epochs, init=args.init, backbone=args.backbone, lr=args.lr, seed=args.seed))
    plan = plan_for(manifest, hw, over)
    epochs = round(plan.epochs)
    points = sorted({int(e) for e in args.at.split(",")}) if args.at else [epochs]
    device = pick_device(None)
    data = read_labels(labels, None)
    index = {label: i for i, label in enumerate(data.classes)}
    y = torch.tensor([index[label] for label in data.labels])
    protocol = make_protocol(data, y, labels)
    train_paths = manifest.absolute_paths()
    sample = sample_paths(train_paths)
    common = {
        "host": host_cpu(),
        "set": args.set.name,
        "tag": args.tag,
        "seed": args.seed,
        "plan": {k: getattr(plan, k) for k in ("image_size", "batch_size", "precision", "total_steps", "base_lr")}
        | {"tau": plan.tau_base, "epochs": plan.epochs},
    }
    print(json.dumps(common), flush=True)

    train_rows = torch.from_numpy(np.flatnonzero(np.array(data.splits) == "train"))

    def measure(encoder: torch.nn.Module, label_free: bool = True, **where: object) -> None:
        t0 = time.perf_counter()
        features, _ = embed_paths(data.paths, encoder, device, 256, None)
        scores = score(features, y, len(data.classes), protocol)
        # What `byol train --labels` sees with the train split's labels only: its choose part's scores.
        chosen = score_candidates({"e": features[train_rows]}, y[train_rows], len(data.classes))[0]["e"]
        line = {
            **common,
            **where,
            "knn": round(scores["knn"]["top1"], 4),
            "linear": round(scores["linear"]["top1"], 4),
            **chosen,
        }
        if label_free and not args.no_label_free:
            sample_features, _ = embed_paths(sample, encoder, device, 256, None)
            size = encoder.byol_metadata["image_size"]
            first, second = view_embeddings(sample, {"e": encoder}, size, device, 0)["e"]
            line |= {
                "rankme": round(rankme(sample_features), 2),
                "uniformity": round(uniformity(sample_features), 4),
                "alignment": round(alignment(first, second), 4),
                "view_retrieval": round(view_retrieval(first, second), 4),
            }
        line["score_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(line), flush=True)
        with open(args.record, "a") as f:
            f.write(json.dumps(line) + "\n")

    trainer = Trainer(plan, train_paths)
    trained = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "encoder.safetensors"

        def export(size: int) -> torch.nn.Module:
            save_encoder(
                trainer.model.online_encoder,
                path,
                architecture=plan.backbone,
                image_size=size,
                mean=MEAN,
                std=STD,
                train_images=plan.images,
                epochs=trainer.step / plan.steps_per_epoch,
                steps=trainer.step,
                init=start_name(plan.init),
                init_path=plan.init,
            )
            return load_encoder(path, device)

        start = export(plan.image_size)
        start_state = {k: v.clone() for k, v in start.state_dict().items()}
        if not args.no_baselines:
            measure(start, epoch=0, mix=0.0, size=plan.image_size, train_seconds=0.0)
            if plan.image_size != 32:
                measure(export(32), epoch=0, mix=0.0, size=32, train_seconds=0.0)
            measure(
                random_init_network(start.byol_metadata, device),
                label_free=False,
                epoch=0,
                mix=None,
                size=plan.image_size,
                train_seconds=0.0,
                network="random init",
            )
        if args.baselines_only:
            return
        for epoch in points:
            t0 = time.perf_counter()
            trainer.run(min(plan.total_steps, epoch * plan.steps_per_epoch))
            trained += time.perf_counter() - t0
            adapted = export(plan.image_size)
            mixes = [float(x) for x in args.mix.split(",")]
            if epoch == points[-1]:
                mixes += [float(x) for x in args.final_mix.split(",") if float(x) not in mixes]
            for m in mixes:
                mixed = mixed_encoder(adapted, start_state, m)
                where = dict(epoch=epoch, mix=m, size=plan.image_size, train_seconds=round(trained, 1))
                label_free = m in [float(x) for x in args.mix.split(",")]
                measure(mixed, label_free=label_free and not args.recalibrate, **where)
                if args.recalibrate:
                    [measured] = recalibrated([mixed], train_paths, device)
                    measure(measured, label_free=label_free, recalibrated=True, **where)
            if args.recalibrate and epoch == points[-1]:
                where = dict(epoch=epoch, mix=0.0, size=plan.image_size, train_seconds=round(trained, 1))
                measure(recalibrated([start], train_paths, device)[0], label_free=False, recalibrated=True, **where)


if __name__ == "__main__":
    main()
