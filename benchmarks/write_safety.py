"""What the safe-write paths cost: checkpoints through a Python file, embed arrays with reserved space.

    python benchmarks/write_safety.py [--dir DIR] [--rounds 5]

Times, alternated round by round after a warm-up, in DIR (default: a temporary folder on this disk):
- a checkpoint-sized state (BYOL ResNet-18: online, target and LARS momentum) written by
  torch.save to a path, and through an open Python file (what Trainer.save does, so that a full
  disk surfaces as an OSError);
- a 100,000 × 512 float32 memory map created as numpy creates it (sparse), and with its space
  reserved by posix_fallocate (embed.allocated_memmap).
Prints one JSON line of medians and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import host_cpu

from byolcli.core.embed import allocated_memmap
from byolcli.training.byol import BYOL


def checkpoint_state() -> dict:
    model = BYOL("resnet18")
    momentum = {name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}
    return {"model": model.state_dict(), "momentum": momentum}


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        state = checkpoint_state()

        def to_path():
            torch.save(state, folder / "by_path.pt")

        def to_file():
            with open(folder / "by_file.pt", "wb") as file:
                torch.save(state, file)

        def sparse():
            np.lib.format.open_memmap(folder / "sparse.npy", mode="w+", dtype=np.float32, shape=(100_000, 512))
            (folder / "sparse.npy").unlink()

        def reserved():
            allocated_memmap(folder / "reserved.npy", np.float32, (100_000, 512))
            (folder / "reserved.npy").unlink()

        pairs = {"checkpoint": (to_file, to_path), "embed array": (reserved, sparse)}
        times = {name: ([], []) for name in pairs}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, (new, old) in pairs.items():
                new_s, old_s = timed(new), timed(old)
                if round_:
                    times[name][0].append(new_s)
                    times[name][1].append(old_s)
        result = {
            "host": host_cpu(),
            "rounds": args.rounds,
            "checkpoint_mb": round((folder / "by_path.pt").stat().st_size / 1e6, 1),
        }
        for name, (new, old) in times.items():
            result[name] = {
                "safe_s": round(statistics.median(new), 4),
                "plain_s": round(statistics.median(old), 4),
                "ratio_median": round(statistics.median(n / o for n, o in zip(new, old)), 3),
            }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
