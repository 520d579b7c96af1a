"""Peak memory of `byol embed` on 1,000 and on 100,000 small generated images.

    python benchmarks/embed_memory.py [--small 1000] [--large 100000]

The rows go to a memory-mapped .npy, so peak memory should not grow with the
number of images (only the scan's file list and the path sidecar do, a few
hundred bytes per image). Each run is a fresh `byol embed` process; the peak
resident set size of it and of its loader workers is read with getrusage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import build_folder, export_random_encoder

WRAPPER = (
    "import resource, subprocess, sys, json, time; t = time.perf_counter(); "
    "code = subprocess.run(sys.argv[1:]).returncode; "
    "print(json.dumps({'code': code, 'seconds': time.perf_counter() - t, "
    "'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"
)


def embed(folder: Path, model: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "byolcli", "-q", "embed", str(folder), "--out", str(out), "--model", str(model)]
    result = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--large", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="byol-embed-mem-"))
    os.environ["BYOL_CACHE_DIR"] = str(work / "cache")
    try:
        model = export_random_encoder(work, 32)
        for count in (args.small, args.large):
            folder = work / f"images-{count}"
            build_folder(folder, count)
            result = embed(folder, model, work / f"vecs-{count}.npy")
            assert result["code"] == 0, result
            print(
                f"{count:>7,} images: peak RSS {result['peak_mb']:7.0f} MB, {result['seconds']:6.1f} s "
                f"({count / result['seconds']:,.0f} images/s)",
                flush=True,
            )
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
