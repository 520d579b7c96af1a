"""Where one training step's time goes: making the views, forward, backward, optimizer, EMA.

    python benchmarks/step_phases.py [FOLDER] [--steps 25]

byolcli's Trainer as `byol train` plans it on this CPU for FOLDER (ResNet-18, 32 px, batch 64,
fp32, channels-last, images decoded once into memory, both views made in batches), each phase
timed on its own for --steps steps after 5 warm-up steps; medians per phase.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import CIFAR_TRAIN, cpu_plan

from byolcli.core.scan import scan
from byolcli.training.engine import Trainer

PHASES = ("views", "forward", "backward", "optimizer", "EMA")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", type=Path, default=CIFAR_TRAIN)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()

    paths = scan(args.folder).absolute_paths()
    trainer = Trainer(cpu_plan(len(paths), "fp32", 0, in_memory=True), paths)
    trainer.run(5)
    batches = iter(trainer.loader)
    times = {phase: [] for phase in PHASES}
    for _ in range(args.steps):
        marks = [time.perf_counter()]
        view1, view2 = trainer._views(next(batches))
        marks.append(time.perf_counter())
        loss, _ = trainer.model(view1, view2)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        trainer.model.update_target(0.99)
        marks.append(time.perf_counter())
        for phase, start, end in zip(PHASES, marks, marks[1:]):
            times[phase].append((end - start) * 1e3)
    medians = {phase: statistics.median(values) for phase, values in times.items()}
    total = sum(medians.values())
    for phase, ms in medians.items():
        print(f"{phase:>9}: {ms:6.1f} ms  {ms / total:4.0%}")
    print(f"{'step':>9}: {total:6.1f} ms  ({64 / total * 1e3:.1f} images/s)")


if __name__ == "__main__":
    main()
