"""byolcli against its peers (lightly, byol-pytorch), same machine, same folder, same scorer.

    bash benchmarks/peers/setup.sh                       # once: the peers' own virtual environment
    python benchmarks/peers/run.py throughput            # images/s at identical settings, A B C A B C …
    python benchmarks/peers/run.py quality --budgets 2 5 10 20 [--systems byolcli lightly byol-pytorch]
    python benchmarks/peers/run.py quality --budgets 10 --systems byolcli --byolcli-args "--image-size 64"
    python benchmarks/peers/run.py quality --budgets 5 --init START.safetensors   # every system from those weights
    python benchmarks/tables.py                          # benchmarks/README.md's tables from results.json

Identical settings: torchvision ResNet-18, 32 px, batch 64, fp32, one loader process,
reading the JPEG files of cifar10-5k/train. byolcli also runs at its own plan (which on
2 cores decodes the set once into memory, and decodes in the training process where it
does not fit). Quality: every system trains for the same wall-clock budget, its backbone
is exported to an encoder file, and one scorer rates them all: weighted kNN (k=20, T=0.07,
cosine on L2-normalised features), train split as memory, test split as queries, every
image resized and centre-cropped to 32 px. Results accumulate in results.json, so budgets
can be run in separate sittings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from common import host_cpu, peers_tables  # noqa: E402 - the benchmarks' shared helpers, beside this folder

DATA = REPO.parent / "shared" / "data" / "cifar10-5k"
PEER_PYTHON = HERE / ".venv" / "bin" / "python"
RESULTS = HERE / "results.json"
SIZE = 32
IDENTICAL = ("--image-size", "32", "--batch-size", "64", "--backbone", "resnet18", "--precision", "fp32")
IDENTICAL_NAME = "byolcli (1 loader process; its plan decodes the set once, into memory)"
PER_IMAGE_NAME = "byolcli (1 loader process decoding and augmenting per image, as the peers do)"


# --- the shared scorer --------------------------------------------------------------


def load_split(split: str) -> tuple[list[Path], list[str]]:
    from byolcli.core.labels import read_labels

    data = read_labels(DATA / "labels.csv")
    rows = [i for i, s in enumerate(data.splits) if s == split]
    return [data.paths[i] for i in rows], [data.labels[i] for i in rows]


def pixels(paths: list[Path], size: int) -> torch.Tensor:
    from byolcli.core.inference import load_for_embedding

    return torch.stack([load_for_embedding(p, size) for p in paths])


def knn_top1(train_x: torch.Tensor, train_y: list[str], test_x: torch.Tensor, test_y: list[str]) -> float:
    from byolcli.evaluation.metrics import knn_scores

    classes = sorted(set(train_y))
    index = {c: i for i, c in enumerate(classes)}
    train_t = torch.tensor([index[c] for c in train_y])
    test_t = torch.tensor([index[c] for c in test_y])
    votes = knn_scores(train_x, train_t, test_x, len(classes))
    return (votes.argmax(1) == test_t).float().mean().item()


def features(encoder: torch.nn.Module | None, images: torch.Tensor, mean, std) -> torch.Tensor:
    """Backbone features of uint8 images, or the mean-centred pixels themselves (encoder None)."""
    from byolcli.core.pixels import normalize_images

    if encoder is None:
        flat = images.flatten(1).float()
        return flat - flat.mean(0)
    encoder.eval()
    with torch.no_grad():
        return torch.cat(
            [encoder(normalize_images(images[i : i + 256], mean, std)) for i in range(0, len(images), 256)]
        )


def score(encoder: torch.nn.Module | None, mean=None, std=None, size: int = SIZE) -> float:
    train_paths, train_y = load_split("train")
    test_paths, test_y = load_split("test")
    train_images, test_images = pixels(train_paths, size), pixels(test_paths, size)
    return knn_top1(
        features(encoder, train_images, mean, std), train_y, features(encoder, test_images, mean, std), test_y
    )


def backbone_from_state(path: Path) -> torch.nn.Module:
    from byolcli.core.backbones import make_backbone

    model = make_backbone("resnet18")
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


# --- training each system -------------------------------------------------------------


def train_byolcli(seconds: float, out: Path, extra: list[str]) -> dict:
    """`byol train` with its automatic plan (bar `extra` flags) for a wall-clock budget; returns its last metrics."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "byolcli",
            "-q",
            "train",
            str(DATA / "train"),
            "--time",
            f"{seconds}s",
            "--out",
            str(out),
            *extra,
        ],
        check=True,
    )
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def train_peer(system: str, args: list[str]) -> dict:
    result = subprocess.run(
        [str(PEER_PYTHON), str(HERE / "peer_train.py"), system, str(DATA / "train"), *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def byolcli_speed(extra: tuple) -> float:
    """Median images/s of one epoch of `byol train`, over its metrics windows after the first (start-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "byolcli",
                "-q",
                "train",
                str(DATA / "train"),
                "--epochs",
                "1",
                "--out",
                f"{tmp}/run",
                *extra,
            ],
            check=True,
            capture_output=True,
        )
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_s"] for r in rows[1:] or rows)


def throughput(rounds: int, steps: int) -> dict:
    systems = {
        IDENTICAL_NAME: lambda: byolcli_speed(IDENTICAL + ("--workers", "1")),
        PER_IMAGE_NAME: lambda: byolcli_speed(IDENTICAL + ("--workers", "1", "--augment-on", "cpu")),
        "lightly": lambda: train_peer("lightly", ["--steps", str(steps)])["images_per_s"],
        "byol-pytorch": lambda: train_peer("byol-pytorch", ["--steps", str(steps)])["images_per_s"],
    }
    runs = {name: [] for name in systems}
    for r in range(rounds):  # alternated, so that the machine's drift hits every system alike
        for name, run in systems.items():
            runs[name].append(run())
            print(f"round {r + 1}: {name}: {runs[name][-1]:.1f} images/s", flush=True)
    return {name: {"runs": values, "median": statistics.median(values)} for name, values in runs.items()}


def quality(budgets: list[float], systems: list[str], byolcli_args: list[str], init: Path | None = None) -> dict:
    """Train every system for every budget and score it. byol-pytorch has no schedule, so one run
    as long as the longest budget, with snapshots at the others, gives its whole curve. With `init`,
    every system starts from those ResNet-18 weights (byolcli: --init, with its own recipe for a start)."""
    results = {}
    imagenet_stats = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the peers' normalisation
    start = f" from {init.name}" if init is not None else ""
    label = " ".join(["byolcli", *byolcli_args]) + start
    peer_init = ["--init", str(init)] if init is not None else []
    if init is not None:
        byolcli_args = [*byolcli_args, "--init", str(init), "--backbone", "resnet18"]

    def record(system: str, minutes: float, top1: float, info: dict) -> None:
        system = system if system.startswith("byolcli") else system + start
        results[f"{system}@{minutes:g}"] = {
            **info,  # first: a peer's own line names the peer, not the run
            "system": system,
            "minutes": minutes,
            "knn_top1": top1,
            "host": host_cpu(),
        }
        print(f"{system}, {minutes:g} min: kNN top-1 {top1:.1%} ({info})", flush=True)

    if "byol-pytorch" in systems:
        with tempfile.TemporaryDirectory() as tmp:
            out, longest = Path(tmp) / "backbone.pt", max(budgets)
            shorter = [m * 60 for m in budgets if m < longest]
            info = train_peer(
                "byol-pytorch",
                [
                    "--seconds",
                    str(longest * 60),
                    "--out",
                    str(out),
                    *(["--snapshot-at", *map(str, shorter)] if shorter else []),
                    *peer_init,
                ],
            )
            steps = info.pop("snapshot_steps")
            for minutes in sorted(budgets):
                seconds = minutes * 60
                path = out if minutes == longest else Path(tmp) / f"backbone-{seconds:g}s.pt"
                snapshot = {
                    "steps": info["steps"] if minutes == longest else steps[f"{seconds:g}"],
                    "images_per_s": info["images_per_s"],
                    "snapshot_of_a_run_of_minutes": longest,
                }
                record("byol-pytorch", minutes, score(backbone_from_state(path), *imagenet_stats), snapshot)
    for minutes in budgets:
        seconds = minutes * 60
        for system in [s for s in systems if s != "byol-pytorch"]:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp)
                if system == "byolcli":
                    from byolcli.core.encoder import load_encoder

                    last = train_byolcli(seconds, out / "run", byolcli_args)
                    encoder = load_encoder(out / "run" / "encoder.safetensors")
                    meta = encoder.byol_metadata
                    top1 = score(encoder, meta["mean"], meta["std"])
                    info = {
                        "steps": last["step"],
                        "images_per_s": last["images_per_s"],
                        "image_size": meta["image_size"],
                    }
                    if meta["image_size"] != SIZE:  # its features at the size it trained at, too
                        info["knn_top1_at_own_size"] = score(encoder, meta["mean"], meta["std"], meta["image_size"])
                    system = label
                else:
                    info = train_peer(
                        system, ["--seconds", str(seconds), "--out", str(out / "backbone.pt"), *peer_init]
                    )
                    info.pop("snapshot_steps")
                    top1 = score(backbone_from_state(out / "backbone.pt"), *imagenet_stats)
            record(system, minutes, top1, info)
    return results


def baselines() -> dict:
    from byolcli.core.backbones import make_backbone
    from byolcli.core.pixels import MEAN, STD

    torch.manual_seed(0)
    network = make_backbone("resnet18")
    return {
        "random-init ResNet-18": score(network, MEAN, STD),
        "raw pixels": score(None),
        "random-init ResNet-18 at 64 px": score(network, MEAN, STD, 64),
    }


# --- results ----------------------------------------------------------------------------


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save_results(update: dict) -> None:
    results = load_results()
    for key, value in update.items():
        results.setdefault(key, {}).update(value)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser("throughput")
    speed.add_argument("--rounds", type=int, default=3)
    speed.add_argument("--steps", type=int, default=40, help="timed steps per peer run")
    runs = sub.add_parser("quality")
    runs.add_argument("--budgets", type=float, nargs="+", default=[2, 5, 10, 20], help="minutes")
    runs.add_argument("--systems", nargs="+", default=["byolcli", "lightly", "byol-pytorch"])
    runs.add_argument(
        "--byolcli-args",
        default="",
        help="flags for byol train, e.g. '--image-size 64' (recorded under 'byolcli --image-size 64')",
    )
    runs.add_argument("--init", type=Path, help="every system starts from this plain ResNet-18 state dict")
    sub.add_parser("baselines")
    args = parser.parse_args()
    needs_peers = args.command == "throughput" or (args.command == "quality" and set(args.systems) - {"byolcli"})
    if needs_peers and not PEER_PYTHON.exists():
        sys.exit(f"{PEER_PYTHON}: missing; run bash {HERE / 'setup.sh'} first")
    if args.command == "throughput":
        measured = {
            "date": datetime.now(timezone.utc).date().isoformat(),
            "systems": throughput(args.rounds, args.steps),
        }
        save_results({"throughput_by_host": {host_cpu(): measured}})
    elif args.command == "quality":
        quality_runs = quality(args.budgets, args.systems, args.byolcli_args.split(), args.init)
        save_results({"quality_from_weights" if args.init else "quality": quality_runs})
    elif args.command == "baselines":
        save_results({"baselines": baselines()})
    print(peers_tables(load_results()))


if __name__ == "__main__":
    main()
