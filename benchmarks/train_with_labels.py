"""`byol train --labels` as a user runs it on each shared set, then `byol evaluate --labels` on what it
exported: the candidate chosen, the seconds choosing took against the run's, and the chosen encoder's
test-split kNN / linear top-1 against its start's; and the same for what the run exports without
--labels (the plan's mix), from the same training.

    python benchmarks/train_with_labels.py SET [SET ...] --init WEIGHTS [--record benchmarks/train_with_labels.jsonl]
        [--chooser "what the record calls the rule measured"]

Per SET: `byol train SET/train --init WEIGHTS --backbone resnet18 --labels SET/train.csv` (the train split's
labels only), then `byol evaluate --labels SET/labels.csv` (its split column: train rows fit, test rows
score). Then the run folder is copied without its encoder and `byol train` without --labels finishes the
copy (no step left to train: it exports the plan's mix), which is evaluated alike. One JSON line per set
goes to stdout and to --record.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import host_cpu

from byolcli.cli import parse_duration

RECORD = Path(__file__).resolve().parent / "train_with_labels.jsonl"
BYOL = [sys.executable, "-m", "byolcli"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sets", type=Path, nargs="+")
    parser.add_argument("--init", required=True, type=Path)
    parser.add_argument("--record", type=Path, default=RECORD)
    parser.add_argument("--chooser", default="the plan's export unless one of four is clearly better")
    args = parser.parse_args()
    for folder in args.sets:
        with tempfile.TemporaryDirectory() as scratch:
            run, scores = Path(scratch) / "run", Path(scratch) / "scores.json"
            began = time.perf_counter()
            train = subprocess.run(
                [*BYOL, "train", folder / "train", "--init", args.init.resolve(), "--backbone", "resnet18",
                 "--labels", folder / "train.csv", "--out", run],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            wall = time.perf_counter() - began
            took, planned = re.search(r"choosing took (\S+); the run's plan (\S+)", train.stderr).groups()
            chosen = re.search(r"exported: (.+?), (no candidate|clearly better)", train.stderr).group(1)
            scored = re.search(r"candidates, scored on ([\d,]+) labelled images", train.stderr).group(1)
            shutil.copytree(run, Path(scratch) / "plain")
            (Path(scratch) / "plain" / "encoder.safetensors").unlink()
            subprocess.run(
                [*BYOL, "-q", "train", folder / "train", "--init", args.init.resolve(), "--backbone", "resnet18",
                 "--out", Path(scratch) / "plain"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            top1 = {}
            for name, encoder in (("chosen", run), ("plan's export", Path(scratch) / "plain")):
                subprocess.run(
                    [*BYOL, "-q", "evaluate", "--labels", folder / "labels.csv", "--model",
                     encoder / "encoder.safetensors", "--json", scores],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                report = json.loads(scores.read_text())
                top1 |= {
                    (name if column == "encoder" else column): [round(results[m]["top1"], 4) for m in ("knn", "linear")]
                    for column, results in report["results"].items()
                }
        line = {
            "chooser": args.chooser,
            "host": host_cpu(),
            "set": folder.name,
            "chosen": chosen,
            "labels_scored": int(scored.replace(",", "")),
            "choosing_seconds": parse_duration(took),
            "planned_seconds": parse_duration(planned),
            "train_command_seconds": round(wall, 1),
            "top1": top1,
            "best_start": report.get("best_start"),
        }
        print(json.dumps(line), flush=True)
        with open(args.record, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
