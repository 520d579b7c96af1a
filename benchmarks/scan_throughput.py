"""Scan throughput on a generated folder of small images: cold (no cache) and cached.

    python benchmarks/scan_throughput.py [--files 100000] [--runs 3]

Builds the folder once under /tmp (100 subfolders of 32x32 JPEGs, a few percent
of them PNG), then times `byolcli.core.scan.scan` with an empty cache (every file
opened and decoded) and again with the cache of the previous run (stat only).
Reports the median over --runs after one warm-up run of each kind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import build_folder

from byolcli.core import scan as s


def timed_scan(folder: Path) -> float:
    start = time.perf_counter()
    manifest = s.scan(folder)
    elapsed = time.perf_counter() - start
    assert not manifest.skipped
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="byol-scan-bench-"))
    folder, cache = work / "images", work / "cache"
    os.environ["BYOL_CACHE_DIR"] = str(cache)
    try:
        t0 = time.perf_counter()
        build_folder(folder, args.files)
        print(f"built {args.files:,} files in {time.perf_counter() - t0:.1f}s; {os.cpu_count()} CPUs")
        cold, cached = [], []
        for run in range(args.runs + 1):  # run 0 is the warm-up
            shutil.rmtree(cache, ignore_errors=True)
            c = timed_scan(folder)
            w = timed_scan(folder)
            if run:
                cold.append(c)
                cached.append(w)
        for name, times in (("cold", cold), ("cached", cached)):
            median = statistics.median(times)
            print(
                f"{name:>6}: median {median:6.2f}s = {args.files / median:9,.0f} files/s  "
                f"(runs: {', '.join(f'{t:.2f}' for t in times)})"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
