"""byolcli's linear probe against scikit-learn's LogisticRegressionCV, on the same vectors and split.

    bash benchmarks/peers/setup.sh        # once: the benchmarks' own environment, with scikit-learn
    python benchmarks/probe_vs_sklearn.py LABELS.csv --model ENCODER [--classes A,B --train-rows 250]

Embeds the CSV's images with the encoder (`byol evaluate`'s embedding), then fits both probes on
the train rows only (each choosing its regularisation its own way, on those rows) and scores both
on the test rows. scikit-learn runs in benchmarks/peers/.venv, so it is never a dependency of
byolcli: standardised features, LogisticRegressionCV over 17 values of C from 1e-4 to 1e4 with
stratified 5-fold cross-validation, and for reference the best C chosen on the test rows
themselves (an upper bound no honest probe reaches). `--classes` and `--train-rows` cut a small
subset: the train rows of those classes, a stratified sample of that many, and all their test rows.

It also times both: byolcli's probe as the median of --rounds runs after a warm-up, scikit-learn's
`LogisticRegressionCV` as one fit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import host_cpu

from byolcli.core.inference import embed_paths
from byolcli.core.labels import read_labels
from byolcli.core.model_choice import choose_model
from byolcli.evaluation.metrics import linear_probe_scores, stratified_holdout

PEER_PYTHON = Path(__file__).resolve().parent / "peers" / ".venv" / "bin" / "python"
SKLEARN = """
import json, sys, time
import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

data = np.load(sys.argv[1])
scaler = StandardScaler().fit(data["train_x"])
train_x, test_x = scaler.transform(data["train_x"]), scaler.transform(data["test_x"])
Cs = np.logspace(-4, 4, 17)
cv = LogisticRegressionCV(Cs=Cs, cv=StratifiedKFold(5, shuffle=True, random_state=0), max_iter=3000)
start = time.perf_counter()
cv.fit(train_x, data["train_y"])
seconds = time.perf_counter() - start
oracle = max((LogisticRegression(C=C, max_iter=3000).fit(train_x, data["train_y"]).score(test_x, data["test_y"]), C)
             for C in Cs)
print(json.dumps({"top1": cv.score(test_x, data["test_y"]), "C": float(cv.C_[0]), "seconds": round(seconds, 2),
                  "best_C_on_test": {"top1": oracle[0], "C": float(oracle[1])}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("labels", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--classes", default=None, help="comma-separated: keep only these classes")
    parser.add_argument("--train-rows", type=int, default=None, help="a stratified sample of this many train rows")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of byolcli's probe")
    args = parser.parse_args()

    data = read_labels(args.labels)
    keep = [i for i, label in enumerate(data.labels) if not args.classes or label in args.classes.split(",")]
    classes = sorted({data.labels[i] for i in keep})
    y = torch.tensor([classes.index(data.labels[i]) for i in keep])
    splits = np.array([data.splits[i] for i in keep])
    train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
    if args.train_rows and args.train_rows < len(train):
        _, sample = stratified_holdout(y[train], args.train_rows / len(train), seed=0)
        train = train[np.sort(sample.numpy())]
    model = choose_model(args.model)
    features, ok = embed_paths([data.paths[i] for i in keep], model.load("cpu"), torch.device("cpu"), 256, None)
    assert ok.all(), "some listed images could not be decoded"
    probe = lambda: linear_probe_scores(features[train], y[train], features[test], len(classes))  # noqa: E731
    logits, decay, at_edge = probe()  # also the warm-up of the timed rounds
    seconds = timed_probe(probe, args.rounds)
    ours = (logits.argmax(1) == y[test]).float().mean().item()
    with tempfile.TemporaryDirectory() as scratch:
        arrays = Path(scratch) / "vectors.npz"
        np.savez(
            arrays,
            train_x=features[train].numpy(),
            train_y=y[train].numpy(),
            test_x=features[test].numpy(),
            test_y=y[test].numpy(),
        )
        theirs = json.loads(
            subprocess.run(
                [str(PEER_PYTHON), "-c", SKLEARN, str(arrays)], check=True, capture_output=True, text=True
            ).stdout
        )
    print(
        json.dumps(
            {
                "host": host_cpu(),
                "labels": str(args.labels),
                "model": model.description,
                "classes": len(classes),
                "train_rows": len(train),
                "test_rows": len(test),
                "byolcli": {"top1": round(ours, 4), "weight_decay": decay, "at_grid_edge": at_edge, "seconds": seconds},
                "sklearn": theirs,
                "difference_points": round((ours - theirs["top1"]) * 100, 2),
            }
        )
    )


def timed_probe(probe, rounds: int) -> float:
    """Median seconds of `probe` over `rounds` runs (the caller has warmed it up)."""
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        probe()
        seconds.append(time.perf_counter() - start)
    return round(statistics.median(seconds), 2)


if __name__ == "__main__":
    main()
