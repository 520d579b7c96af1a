"""Forward + backward of ResNet-18's convolutions on small maps: torch's convolution against
byolcli's matrix product (small_maps.py), on this machine's CPU.

    python benchmarks/small_maps.py [--rounds 5] [--calls 20]

Batch 128 (both views of a batch of 64), fp32, as training runs them: channels-last inputs
and weights, and each call starts with no gradient (the trainer sets them to None after every
step), so the weight's gradient is made afresh in the weight's layout. The shapes ResNet-18
meets at 32 px. Each round times both methods, alternated; a round's figure is the median of --calls
calls after three warm-up calls; printed: the median over rounds.
"""

import argparse
import statistics

import torch
from common import milliseconds
from torch import nn

from byolcli.core.small_maps import SmallMapConv2d

# (where in ResNet-18 at 32 px, channels in, channels out, map side, kernel, stride)
SHAPES = [
    ("layer3, 3×3 on 2×2", 256, 256, 2, 3, 1),
    ("layer4's first, 3×3 stride 2 on 2×2", 256, 512, 2, 3, 2),
    ("layer4, 3×3 on 1×1", 512, 512, 1, 3, 1),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, c_in, c_out, side, kernel, stride in SHAPES:
        convolution = nn.Conv2d(c_in, c_out, kernel, stride, 1, bias=False)
        matrix_product = SmallMapConv2d(c_in, c_out, kernel, stride, 1, bias=False)
        matrix_product.load_state_dict(convolution.state_dict())
        for module in (convolution, matrix_product):
            module.to(memory_format=torch.channels_last)
        x = torch.randn(128, c_in, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
        upstream = torch.randn_like(convolution(x))

        def step(module):
            module.weight.grad = x.grad = None
            module(x).backward(upstream)

        times = {"convolution": [], "matrix product": []}
        for _ in range(args.rounds):
            for method, module in (("convolution", convolution), ("matrix product", matrix_product)):
                times[method].append(milliseconds(lambda: step(module), args.calls))
        conv_ms, matrix_ms = (statistics.median(t) for t in times.values())
        print(
            f"{name:>36}: convolution {conv_ms:5.2f} ms, matrix product {matrix_ms:5.2f} ms "
            f"({conv_ms / matrix_ms:.1f}×)"
        )


if __name__ == "__main__":
    main()
