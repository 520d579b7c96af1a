"""Seconds `byol train --labels` spends choosing (measuring the candidates' batch-norm statistics, then
scoring them on as many labels as a tenth of the run's compute allows) against the run's planned seconds:
cifar10-5k's train labels (5,000) with the default plan from the stand-in, the stand-in as the start and
a slightly moved copy of it as the trained weights. Median of --rounds after a warm-up round.

    python benchmarks/choose_cost.py [--rounds 3]
"""

import argparse
import statistics
import time

import torch
from common import SHARED_DATA as S
from common import host_cpu

from byolcli.core.backbones import make_backbone
from byolcli.core.encoder import with_metadata
from byolcli.core.hardware import detect_hardware
from byolcli.core.pixels import MEAN, STD
from byolcli.core.scan import scan
from byolcli.core.start import start_weights
from byolcli.core.terminal import Reporter
from byolcli.training.candidates import candidates, labels_to_score, read_training_labels
from byolcli.training.plan import Overrides
from byolcli.training.train import choose_with_labels, plan_for
from byolcli.training.train_flags import validate

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()
init = str(S / "pretrained/resnet18-tinyimagenet64.safetensors")
manifest = scan(S / "cifar10-5k/train")
plan = plan_for(manifest, detect_hardware(None), validate(Overrides(init=init, backbone="resnet18")))
start = start_weights(init, "resnet18")
torch.manual_seed(1)
trained = make_backbone("resnet18")
trained.load_state_dict(start)
with torch.no_grad():
    for p in trained.parameters():
        p.add_(0.01 * torch.randn_like(p))
trained = with_metadata(
    trained.eval(),
    architecture="resnet18",
    image_size=plan.image_size,
    mean=MEAN,
    std=STD,
    train_images=5000,
    epochs=plan.epochs,
    steps=plan.total_steps,
)
images = manifest.absolute_paths()
labelled = read_training_labels(S / "cifar10-5k/train.csv", images)
cpu = torch.device("cpu")
rounds = []
for _ in range(args.rounds + 1):
    began = time.perf_counter()
    found = candidates(trained, start, None, plan.mix, images, cpu)
    measuring = time.perf_counter() - began
    limit = labels_to_score(plan.total_steps * plan.effective_batch, found, len(images), labelled)
    chosen = choose_with_labels(found, labelled, limit, f"mix {plan.mix:g}", cpu, Reporter(quiet=True))
    rounds.append((measuring, time.perf_counter() - began - measuring))
measuring, scoring = (statistics.median(r[i] for r in rounds[1:]) for i in (0, 1))
print(
    f"{host_cpu()}: run planned {plan.estimated_seconds:.1f} s "
    f"({plan.total_steps} steps at {plan.step_seconds:.2f} s); "
    f"choosing {measuring + scoring:.1f} s = {(measuring + scoring) / plan.estimated_seconds:.1%} "
    f"({measuring:.1f} s measuring {len(found) - 1} networks' statistics, {scoring:.1f} s scoring {len(found)} "
    f"candidates on {limit} of {len(labelled.paths)} labels); chose {chosen.name}"
)
