"""Training images/s end to end from a JPEG folder, next to the same step on pre-made tensors.

    python benchmarks/train_throughput.py [FOLDER] [--rounds 3] [--steps 20]

ResNet-18, 32 px, batch 64, with the loader workers `byol train` picks on this machine
(none on 2 cores: decoding runs in the training process). Each round runs, alternately,
(A) byolcli's Trainer reading FOLDER (decode + per-image augmentation in the loader),
(B) the Trainer with the images decoded once into memory and both views made in batches
(what `byol train` plans when the set fits in memory) and (C) the same Trainer fed tensors
made beforehand, so that the gaps are the data pipeline's cost. Both in fp32 and in the
precision the plan picks on this machine, channels-last as `byol train` plans on a CPU.
Medians over the rounds, after one warm-up step sequence per measurement.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import CIFAR_TRAIN, cpu_plan

from byolcli.core.hardware import detect_hardware
from byolcli.core.loading import choose_workers, device_precision
from byolcli.core.scan import scan
from byolcli.training.engine import Trainer


def images_per_second(trainer: Trainer, steps: int, warmup: int = 3) -> float:
    trainer.run(trainer.step + warmup)
    start = time.perf_counter()
    trainer.run(trainer.step + steps)
    return steps * 64 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", type=Path, default=CIFAR_TRAIN)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    paths = scan(args.folder).absolute_paths()
    hw = detect_hardware("cpu")
    precisions = ["fp32"] + ([device_precision(hw)[0]] if device_precision(hw)[0] != "fp32" else [])
    workers = choose_workers(hw)[0]
    print(f"{len(paths):,} images from {args.folder}; {hw.name}; {workers} loader workers")
    for precision in precisions:
        plan = cpu_plan(len(paths), precision, workers)
        from_files = Trainer(plan, paths)
        in_memory = Trainer(cpu_plan(len(paths), precision, workers, in_memory=True), paths)
        from_tensors = Trainer(plan, paths)
        batch = next(iter(from_tensors.loader))
        from_tensors.loader = [batch] * plan.steps_per_epoch  # the same step, no decoding
        results = {"JPEG folder": [], "in memory": [], "pre-made tensors": []}
        for _ in range(args.rounds):
            results["JPEG folder"].append(images_per_second(from_files, args.steps))
            results["in memory"].append(images_per_second(in_memory, args.steps))
            results["pre-made tensors"].append(images_per_second(from_tensors, args.steps))
        medians = {k: statistics.median(v) for k, v in results.items()}
        for name, values in results.items():
            print(
                f"{precision:>5} {name:>17}: median {medians[name]:6.1f} images/s  "
                f"(rounds: {', '.join(f'{v:.1f}' for v in values)})"
            )
        for name in ("JPEG folder", "in memory"):
            share = 1 - medians[name] / medians["pre-made tensors"]
            print(f"{precision:>5} {name}: the data pipeline costs {share:.0%} of the pre-made-tensor speed")
        print(f"{precision:>5} in memory / JPEG folder: {medians['in memory'] / medians['JPEG folder']:.2f}x")


if __name__ == "__main__":
    main()
