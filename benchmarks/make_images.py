"""Write N photo-sized JPEGs (gradients and shapes, so they compress like photos) for device checks.

python benchmarks/make_images.py FOLDER [--count 20000] [--size 533x400]
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def make(args: tuple[Path, int, int, int]) -> None:
    folder, index, width, height = args
    rng = np.random.default_rng(index)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    colours = rng.uniform(0, 255, (2, 3))
    pixels = (colours[0] * x + colours[1] * y) / 2 + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = [x0, y0, x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    sub = folder / f"class{index % 10}"
    image.filter(ImageFilter.GaussianBlur(1)).save(sub / f"{index:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--size", default="533x400")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    for c in range(10):
        (args.folder / f"class{c}").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(make, [(args.folder, i, width, height) for i in range(args.count)], chunksize=256))
    print(f"wrote {args.count:,} images of {width}x{height} to {args.folder}")


if __name__ == "__main__":
    main()
