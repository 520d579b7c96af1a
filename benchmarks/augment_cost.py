"""Milliseconds to make both BYOL views of a batch in memory (augment.byol_views), and the
reduction that used to dominate its colour jitter: max/min over channels with and without
their indices.

    python benchmarks/augment_cost.py [--rounds 30]

Batch 64 of uint8 canvases (1.5× the output side), on this machine's CPU; medians after
three warm-up calls.
"""

import argparse

import torch
from common import milliseconds

from byolcli.core.pixels import canvas_side
from byolcli.training.augment import byol_views


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    for size in (32, 64):
        canvas = torch.randint(0, 256, (64, 3, canvas_side(size), canvas_side(size)), dtype=torch.uint8)
        sizes = torch.full((64, 2), size)
        images = torch.rand(64, 3, size, size)
        print(
            f"{size} px: byol_views {milliseconds(lambda: byol_views(canvas, sizes, size), args.rounds):.1f} ms; "
            f"max(1)+min(1) {milliseconds(lambda: (images.max(1), images.min(1)), args.rounds):.2f} ms, "
            f"amax(1)+amin(1) {milliseconds(lambda: (images.amax(1), images.amin(1)), args.rounds):.2f} ms"
        )


if __name__ == "__main__":
    main()
