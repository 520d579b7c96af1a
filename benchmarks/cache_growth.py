"""What it costs a vector command to take in ten new images of a folder whose vectors are cached:
time and bytes written, with the cache at ROWS rows.

    python benchmarks/cache_growth.py --folder DIR [--rows 100000] [--rounds 5] [--label NAME] [--out FILE]

Makes ROWS small images in DIR (once; reused by later runs), embeds them into a fresh cache as
`byol groups DIR` would (not timed), then, round after round, copies ten new images into DIR and
reads the folder's vectors again (vectors.store.load_vectors: scan, embed what is new, publish the
cache). Each round is timed, and the bytes the process wrote counted from /proc/self/io
(write_bytes: pages it dirtied, memory-mapped writes included). The first round is a warm-up; the
JSON line gives the medians of the others, and of rounds that add nothing. Run it with PYTHONPATH
at an older checkout to measure that one (it finds the modules under their older names too), and
`--label` to say which it was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import host_cpu
from PIL import Image

try:
    from byolcli.core.backbones import make_backbone
    from byolcli.core.encoder import save_encoder
    from byolcli.core.terminal import Reporter
    from byolcli.vectors.store import load_vectors
except ImportError:  # a checkout from before the package was split into wings
    from byolcli.backbones import make_backbone  # type: ignore[no-redef]
    from byolcli.encoder import save_encoder  # type: ignore[no-redef]
    from byolcli.terminal import Reporter  # type: ignore[no-redef]
    from byolcli.vectors import load_vectors  # type: ignore[no-redef]

SIZE = 16  # px: the smallest image byolcli takes, so that embedding is cheap beside what is measured


def make_images(folder: Path, rows: int) -> None:
    """`rows` 16-px noise PNGs, 1,000 per subfolder (made once)."""
    rng = np.random.default_rng(0)
    for i in range(rows):
        path = folder / f"{i // 1000:04d}" / f"{i:07d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)


def bytes_written() -> int:
    with open("/proc/self/io") as counters:
        return next(int(line.split()[1]) for line in counters if line.startswith("write_bytes"))


def measure(folder: Path, model: Path) -> tuple[float, int]:
    written, start = bytes_written(), time.perf_counter()
    vectors = load_vectors(folder, reporter=Reporter(quiet=True), model=model, device="cpu")
    seconds = time.perf_counter() - start
    del vectors
    return seconds, bytes_written() - written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    make_images(args.folder / "base", args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BYOL_CACHE_DIR"] = str(Path(tmp) / "cache")
        model = Path(tmp) / "encoder.safetensors"
        save_encoder(
            make_backbone("resnet18"),
            model,
            architecture="resnet18",
            image_size=SIZE,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            train_images=1,
            epochs=1,
            steps=1,
        )
        new = args.folder / "new"
        if new.exists():
            for path in new.iterdir():
                path.unlink()
        new.mkdir(exist_ok=True)
        measure(args.folder, model)  # the cache of ROWS rows, and the scan's cache
        adding, unchanged = [], []
        rng = np.random.default_rng(1)
        for round_ in range(args.rounds + 1):
            for i in range(10):
                pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(new / f"{round_:03d}-{i}.png")
            adding.append(measure(args.folder, model))
            unchanged.append(measure(args.folder, model))
    adding, unchanged = adding[1:], unchanged[1:]
    result = {
        "benchmark": "cache_growth",
        "host": host_cpu(),
        "code": args.label,
        "rows": args.rows,
        "rounds": args.rounds,
        "add_10_seconds": round(statistics.median(s for s, _ in adding), 3),
        "add_10_mib_written": round(statistics.median(b for _, b in adding) / 2**20, 2),
        "unchanged_seconds": round(statistics.median(s for s, _ in unchanged), 3),
        "unchanged_mib_written": round(statistics.median(b for _, b in unchanged) / 2**20, 2),
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as out:
            out.write(line + "\n")


if __name__ == "__main__":
    main()
