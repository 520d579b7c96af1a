"""One BYOL step with each view passed separately (byolcli, as the paper) or both views in one
batch (byol-pytorch), on pre-made tensors: how much of the gap to byol-pytorch is the pass.

    python benchmarks/joint_pass.py [--rounds 3] [--steps 15]

ResNet-18, 32 px, batch 64, fp32, LARS and EMA as in `byol train`. The joint pass mixes both
views' batch-norm statistics, which is why byolcli does not use it as it stands.
"""

import argparse
import statistics
import time

import torch

from byolcli.model import BYOL, regression_loss
from byolcli.optim import LARS, lars_groups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = BYOL("resnet18")
    optimizer = LARS(lars_groups(model.online_encoder, model.online_projector, model.predictor), lr=0.1)
    view1, view2 = torch.randn(64, 3, 32, 32), torch.randn(64, 3, 32, 32)

    def separate() -> torch.Tensor:
        return model(view1, view2)[0]

    def joint() -> torch.Tensor:
        both = torch.cat([view1, view2])
        predictions = model.predictor(model.online_projector(model.online_encoder(both)))
        with torch.no_grad():
            targets = model.target_projector(model.target_encoder(both))
        p1, p2 = predictions.chunk(2)
        t1, t2 = targets.chunk(2)
        return regression_loss(p1, t2).mean() + regression_loss(p2, t1).mean()

    def images_per_second(loss_of) -> float:
        def step():
            loss = loss_of()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.update_target(0.99)
        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        return args.steps * 64 / (time.perf_counter() - start)

    results = {"separate passes": [], "one joint pass": []}
    for _ in range(args.rounds):  # alternated
        results["separate passes"].append(images_per_second(separate))
        results["one joint pass"].append(images_per_second(joint))
    for name, values in results.items():
        print(f"{name:>15}: median {statistics.median(values):6.1f} images/s "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(results["one joint pass"]) / statistics.median(results["separate passes"])
    print(f"joint / separate: {ratio:.2f}x")


if __name__ == "__main__":
    main()
