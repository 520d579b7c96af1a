"""What one BYOL training step costs with each ResNet stem, as the planner's probe times it.

    python benchmarks/stem_cost.py [--sizes 32 64] [--batch 64] [--precisions fp32 bf16] [--rounds 3]

ResNet-18, channels-last, on this machine's default device; for each size and precision the two
stems alternate round by round, each round timing two steps after a warm-up (probe.probe_step).
Prints the medians and the small stem's cost over the standard one, pair by pair.
"""

from __future__ import annotations

import argparse
import statistics

from common import host_cpu

from byolcli.core.hardware import detect_hardware
from byolcli.training.probe import StepSetting, probe_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hw = detect_hardware()
    print(f"{host_cpu()}; {hw.name}; ResNet-18, batch {args.batch}")
    for size in args.sizes:
        for precision in args.precisions:
            seconds = {"standard": [], "small": []}
            for _ in range(args.rounds):
                for stem in seconds:
                    setting = StepSetting("resnet18", size, args.batch, precision, True, stem)
                    seconds[stem].append(probe_step(hw, setting))
            ratios = [small / standard for small, standard in zip(seconds["small"], seconds["standard"])]
            medians = {stem: statistics.median(values) for stem, values in seconds.items()}
            print(
                f"{size} px {precision}: standard {medians['standard']:.3f} s/step "
                f"({args.batch / medians['standard']:.0f} images/s), small {medians['small']:.3f} s/step "
                f"({args.batch / medians['small']:.0f} images/s); small/standard "
                f"{statistics.median(ratios):.1f}x (pairs {', '.join(f'{r:.1f}' for r in ratios)})"
            )


if __name__ == "__main__":
    main()
