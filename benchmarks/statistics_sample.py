"""How many of the folder's images the batch-norm statistics need: the stand-in start at 64 px with its
statistics measured on seeded samples of SET/train of several sizes (and on all of it), each scored as
`byol evaluate --labels SET/labels.csv` scores an encoder (kNN and linear top-1 on the test split).

    python benchmarks/statistics_sample.py SET [SET ...] --init WEIGHTS [--sizes 256,512,2048] [--seeds 0,1]

One JSON line per set and sample goes to stdout and to --record.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import host_cpu

from byolcli.core.backbones import make_backbone
from byolcli.core.encoder import with_metadata
from byolcli.core.inference import embed_many
from byolcli.core.labels import read_labels
from byolcli.core.pixels import MEAN, STD
from byolcli.core.scan import scan
from byolcli.core.start import start_weights
from byolcli.evaluation.evaluate import make_protocol, score
from byolcli.training.candidates import recalibrated

RECORD = Path(__file__).resolve().parent / "statistics_sample.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sets", type=Path, nargs="+")
    parser.add_argument("--init", required=True)
    parser.add_argument("--sizes", default="256,512,2048")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--record", type=Path, default=RECORD)
    args = parser.parse_args()
    device = torch.device("cpu")
    start = make_backbone("resnet18")
    start.load_state_dict(start_weights(args.init, "resnet18"))
    start = with_metadata(
        start.eval(), architecture="resnet18", image_size=64, mean=MEAN, std=STD, train_images=0, epochs=0, steps=0
    )
    for folder in args.sets:
        images = scan(folder / "train").absolute_paths()
        samples = {"all": images}
        for size in (int(s) for s in args.sizes.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                if size < len(images):
                    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:size]
                    samples[f"{size} seed {seed}"] = [images[i] for i in order.tolist()]
        began = time.perf_counter()
        networks = {
            name: recalibrated([start], sample, device, limit=len(sample))[0] for name, sample in samples.items()
        }
        networks["start's own statistics"] = start
        measured = time.perf_counter() - began
        data = read_labels(folder / "labels.csv", None)
        index = {label: i for i, label in enumerate(data.classes)}
        y = torch.tensor([index[label] for label in data.labels])
        protocol = make_protocol(data, y, folder / "labels.csv")
        features, good = embed_many(data.paths, networks, device)
        assert np.all(good)
        for name, x in features.items():
            scores = score(x, y, len(data.classes), protocol)
            line = {
                "host": host_cpu(),
                "set": folder.name,
                "sample": name,
                "knn": round(scores["knn"]["top1"], 4),
                "linear": round(scores["linear"]["top1"], 4),
                "measure_seconds_all_samples": round(measured, 1),
            }
            print(json.dumps(line), flush=True)
            with open(args.record, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
