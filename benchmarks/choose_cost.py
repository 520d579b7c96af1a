"""Seconds `byol train --labels` spends making (the mixes' statistics) and scoring its candidates:
cifar10-5k's train labels (5,000), the stand-in as the start and a slightly moved copy of it as the
trained weights.

    python benchmarks/choose_cost.py
"""

import time

import torch
from common import SHARED_DATA as S

from byolcli.core.backbones import make_backbone
from byolcli.core.encoder import with_metadata
from byolcli.core.pixels import MEAN, STD
from byolcli.core.start import start_weights
from byolcli.core.terminal import Reporter
from byolcli.training.candidates import candidates, read_training_labels
from byolcli.training.train import choose_with_labels

init = str(S / "pretrained/resnet18-tinyimagenet64.safetensors")
start = start_weights(init, "resnet18")
torch.manual_seed(1)
trained = make_backbone("resnet18")
trained.load_state_dict(start)
with torch.no_grad():
    for p in trained.parameters():
        p.add_(0.01 * torch.randn_like(p))
trained = with_metadata(
    trained.eval(), architecture="resnet18", image_size=64, mean=MEAN, std=STD, train_images=5000, epochs=5, steps=390
)
images = sorted((S / "cifar10-5k/train").rglob("*.jpg"))
labelled = read_training_labels(S / "cifar10-5k/train.csv", images)
began = time.perf_counter()
found = candidates(trained, start, None, images, torch.device("cpu"))
measured = time.perf_counter() - began
chosen = choose_with_labels(found, labelled, torch.device("cpu"), Reporter(quiet=True))
scored = time.perf_counter() - began - measured
print(
    f"{measured:.1f} s to measure the mixes' batch-norm statistics, {scored:.1f} s to score {len(found)} candidates "
    f"on {len(labelled.paths)} labels; chose {chosen.name}"
)
