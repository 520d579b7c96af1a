"""One BYOL step several ways, on pre-made tensors: each view in its own pass (the paper),
both views in one pass with per-view batch norm (byolcli), and both views in one pass with
batch norm over the mixed batch (byol-pytorch), all channels-last as `byol train` plans on a
CPU; and byolcli's step in the default (NCHW) memory format.

    python benchmarks/joint_pass.py [--rounds 5] [--steps 15] [--batch 64] [--size 32]

ResNet-18, fp32, LARS and EMA as in `byol train`; the variants alternate within each round.
"""

import argparse
import statistics
import time

import torch
from torch import nn

from byolcli.core.backbones import PerViewBatchNorm1d, PerViewBatchNorm2d
from byolcli.training.byol import BYOL, regression_loss
from byolcli.training.optim import LARS, lars_groups


def with_plain_batchnorm(model: BYOL) -> BYOL:
    """The same model with ordinary batch norm, whose statistics cover whatever batch it is given."""
    for module in model.modules():
        if isinstance(module, PerViewBatchNorm2d):
            module.__class__ = nn.BatchNorm2d
        elif isinstance(module, PerViewBatchNorm1d):
            module.__class__ = nn.BatchNorm1d
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    nchw = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(2)]
    view1, view2 = (v.contiguous(memory_format=torch.channels_last) for v in nchw)

    per_view = BYOL("resnet18").to(memory_format=torch.channels_last)
    per_view_nchw = BYOL("resnet18")
    separate = with_plain_batchnorm(BYOL("resnet18")).to(memory_format=torch.channels_last)  # a pass per view
    mixed = with_plain_batchnorm(BYOL("resnet18")).to(memory_format=torch.channels_last)

    def mixed_loss(model: BYOL) -> torch.Tensor:
        both = torch.cat([view1, view2])  # mixed statistics: any order will do
        p1, p2 = model.predictor(model.online_projector(model.online_encoder(both))).chunk(2)
        with torch.no_grad():
            t1, t2 = model.target_projector(model.target_encoder(both)).chunk(2)
        return regression_loss(p1, t2).mean() + regression_loss(p2, t1).mean()

    variants = {
        "separate passes": (separate, lambda m: m(view1, view2)[0]),
        "joint, per-view BN": (per_view, lambda m: m(view1, view2)[0]),
        "joint, mixed BN": (mixed, mixed_loss),
        "joint, per-view BN, NCHW": (per_view_nchw, lambda m: m(*nchw)[0]),
    }
    optimizers = {
        name: LARS(lars_groups(m.online_encoder, m.online_projector, m.predictor), lr=0.1)
        for name, (m, _) in variants.items()
    }

    def images_per_second(name: str) -> float:
        model, loss_of = variants[name]
        optimizer = optimizers[name]

        def step():
            loss = loss_of(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.update_target(0.99)

        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        return args.steps * args.batch / (time.perf_counter() - start)

    results = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            results[name].append(images_per_second(name))
    base = statistics.median(results["separate passes"])
    for name, values in results.items():
        median = statistics.median(values)
        print(
            f"{name:>24}: median {median:6.1f} images/s, {median / base:.2f}x "
            f"(rounds: {', '.join(f'{v:.1f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
