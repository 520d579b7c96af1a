"""Train BYOL with a peer's code, as its own docs and benchmarks do it. Runs in benchmarks/peers/.venv.

    python peer_train.py lightly FOLDER --seconds 300 --out backbone.pt      # a wall-clock budget
    python peer_train.py byol-pytorch FOLDER --steps 60                      # throughput only
    python peer_train.py lightly FOLDER --seconds 300 --init START.safetensors --out backbone.pt

Both peers train a torchvision ResNet-18 (fc removed) at 32 px, batch 64, one loader
process, from the JPEG files, from random weights or from --init (a plain torchvision state
dict, its classifier dropped), so the only differences are each peer's own recipe:

- lightly: its CIFAR-10 benchmark recipe (BYOLTransform without blur, projection and
  prediction heads 4096/256, SGD lr 0.06·batch/128 with momentum 0.9 and weight decay
  5e-4, cosine decay, EMA τ 0.99 → 1 on a cosine, symmetrised negative cosine loss).
- byol-pytorch: its README defaults (BYOL(resnet, image_size, hidden_layer="avgpool"),
  Adam 3e-4, its batch augmentation, τ 0.99).

With --seconds the schedules run on the fraction of the budget used, since the number of
steps that fit is not known in advance. byol-pytorch's recipe has no schedule (constant
learning rate and τ), so its state after t seconds of a longer run is exactly what a run of
t seconds would export: --snapshot-at T … saves those states too (OUT with the seconds
added to its name), and one run gives the whole learning curve. Prints one JSON line:
steps, images, images/s, and the step of each snapshot.
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

SIZE, BATCH, WORKERS = 32, 64, 1
EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class Folder(Dataset):
    def __init__(self, root: str, transform) -> None:
        self.paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in EXTENSIONS)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def resnet18(init: str | None = None) -> nn.Module:
    model = start_from(torchvision.models.resnet18(), init)
    model.fc = nn.Identity()
    return model


def start_from(model: nn.Module, init: str | None) -> nn.Module:
    """`model` holding the backbone weights of `init` (a safetensors state dict; its classifier is not loaded)."""
    if init:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(
            {k: v for k, v in load_file(init).items() if not k.startswith("fc.")}, strict=False
        )
        assert not unexpected and all(k.startswith("fc.") for k in missing), (missing, unexpected)
    return model


def lightly_system(folder: str, init: str | None):
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    backbone = resnet18(init)
    projector, predictor = BYOLProjectionHead(512, 4096, 256), BYOLPredictionHead(256, 4096, 256)
    backbone_ema, projector_ema = copy.deepcopy(backbone), copy.deepcopy(projector)
    deactivate_requires_grad(backbone_ema)
    deactivate_requires_grad(projector_ema)
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=SIZE, gaussian_blur=0.0),
        view_2_transform=BYOLView2Transform(input_size=SIZE, gaussian_blur=0.0),
    )
    params = [*backbone.parameters(), *projector.parameters(), *predictor.parameters()]
    base_lr = 0.06 * BATCH / 128
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=5e-4)
    criterion = NegativeCosineSimilarity()

    def step(views, progress: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * progress))
        tau = 1 - 0.01 * 0.5 * (1 + math.cos(math.pi * progress))  # lightly's cosine_schedule(0.99 → 1)
        update_momentum(backbone, backbone_ema, m=tau)
        update_momentum(projector, projector_ema, m=tau)
        x0, x1 = views
        p0, p1 = predictor(projector(backbone(x0))), predictor(projector(backbone(x1)))
        with torch.no_grad():
            z0, z1 = projector_ema(backbone_ema(x0)), projector_ema(backbone_ema(x1))
        loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return Folder(folder, transform), step, backbone


def byol_pytorch_system(folder: str, init: str | None):
    from byol_pytorch import BYOL

    net = start_from(torchvision.models.resnet18(), init)
    learner = BYOL(net, image_size=SIZE, hidden_layer="avgpool")
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-4)
    transform = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(SIZE),
            torchvision.transforms.CenterCrop(SIZE),
            torchvision.transforms.ToTensor(),
        ]
    )

    def step(images, progress: float) -> None:
        loss = learner(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.update_moving_average()

    return Folder(folder, transform), step, net


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["lightly", "byol-pytorch"])
    parser.add_argument("folder")
    parser.add_argument("--seconds", type=float, help="train for this wall-clock budget")
    parser.add_argument("--steps", type=int, help="time this many steps (after 5 warm-up steps)")
    parser.add_argument("--out", help="save the backbone's state dict here")
    parser.add_argument(
        "--snapshot-at",
        type=float,
        nargs="*",
        default=[],
        help="also save the backbone after this many seconds (byol-pytorch only)",
    )
    parser.add_argument("--init", help="start the backbone from this plain ResNet-18 state dict (safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.snapshot_at and (args.system != "byol-pytorch" or not args.out):
        parser.error("--snapshot-at needs byol-pytorch (no schedule to depend on the budget) and --out")
    make = lightly_system if args.system == "lightly" else byol_pytorch_system
    dataset, step, backbone = make(args.folder, args.init)  # modules are built in training mode
    loader = DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True, persistent_workers=True
    )
    warmup = 5
    steps, start, timed_from = 0, time.perf_counter(), None
    snapshots, pending = {}, sorted(args.snapshot_at)
    done = False
    while not done:
        for batch in loader:
            elapsed = time.perf_counter() - start
            progress = min(1.0, elapsed / args.seconds) if args.seconds else 0.0
            step(batch, progress)
            steps += 1
            if steps == warmup:
                timed_from = time.perf_counter()
            while pending and time.perf_counter() - start >= pending[0]:
                seconds = pending.pop(0)
                save_backbone(backbone, snapshot_path(args.out, seconds))
                snapshots[f"{seconds:g}"] = steps
            if (args.seconds and time.perf_counter() - start >= args.seconds) or (
                args.steps and steps >= warmup + args.steps
            ):
                done = True
                break
    end = time.perf_counter()
    timed = steps - warmup
    print(
        json.dumps(
            {
                "system": args.system,
                "steps": steps,
                "images": steps * BATCH,
                "seconds": round(end - start, 1),
                "images_per_s": round(timed * BATCH / (end - timed_from), 2) if timed > 0 else None,
                "snapshot_steps": snapshots,
            }
        )
    )
    if args.out:
        save_backbone(backbone, args.out)


def snapshot_path(out: str, seconds: float) -> str:
    path = Path(out)
    return str(path.with_name(f"{path.stem}-{seconds:g}s{path.suffix}"))


def save_backbone(backbone: nn.Module, path: str) -> None:
    torch.save({k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}, path)


if __name__ == "__main__":
    main()
