"""Run by test_distributed.py under torchrun: a few training steps on each rank, saving what it saw.

torchrun --nproc-per-node=2 tests/training/distributed_worker.py PLAN.json FOLDER OUT STEPS
"""

import json
import sys
from pathlib import Path

import torch

from byolcli.core.views import TwoViewDataset
from byolcli.training import distributed
from byolcli.training.engine import Trainer
from byolcli.training.plan import Plan


def main(plan_file: str, folder: str, out: str, steps: str) -> None:
    world = distributed.World.from_env()
    distributed.start(world)
    seen = []  # the (epoch, index) items this rank decoded, in order
    original = TwoViewDataset.__getitem__
    TwoViewDataset.__getitem__ = lambda self, key: (seen.append(key), original(self, key))[1]

    plan = Plan.from_dict(json.loads(Path(plan_file).read_text()))
    trainer = Trainer(plan, sorted(Path(folder).iterdir()), world)
    losses = []
    trainer.run(int(steps), on_log=lambda record: losses.append(record["loss"]), log_every=0)
    torch.save(
        {"seen": seen, "losses": losses, "state": trainer.model.state_dict()}, Path(out) / f"rank{world.rank}.pt"
    )
    distributed.stop(world)


if __name__ == "__main__":
    main(*sys.argv[1:])
