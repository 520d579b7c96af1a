"""Would faiss pay for `byol duplicates`? Its pair search against faiss's on the same vectors.

    python -m venv /tmp/faiss && /tmp/faiss/bin/pip install faiss-cpu numpy pillow typer rich
    PYTHONPATH=. /tmp/faiss/bin/python benchmarks/faiss_compare.py --rows 100000
    PYTHONPATH=. /tmp/faiss/bin/python benchmarks/faiss_compare.py --rows 1000000

The vectors are those of `vector_tasks.py scale` (clusters on the sphere, 1% planted near-copies),
centred and made unit length in memory for both. Up to byolcli's exact size both search every pair
(faiss: a flat inner-product index and range_search); beyond it both use inverted lists with the
same number of lists and probes (faiss: IndexIVFFlat trained on the same sample size). Prints JSON:
seconds and the pairs each found, medians of --rounds after one warm-up round.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import faiss
import numpy as np
from common import host_cpu

from byolcli.vectors import search
from byolcli.vectors.duplicates import THRESHOLD
from byolcli.vectors.store import Vectors, unit


def generated(rows: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((1000, dim)).astype(np.float32))
    array = centres[rng.integers(0, 1000, rows)] + 0.06 * rng.standard_normal((rows, dim)).astype(np.float32)
    copies = rng.choice(rows, rows // 100, replace=False)
    targets = rng.permutation(np.setdiff1d(np.arange(rows), copies))[: len(copies)]
    array[targets] = array[copies] + 0.01 * rng.standard_normal((len(copies), dim)).astype(np.float32)
    return unit(array - array.mean(0))


def byolcli_pairs(array: np.ndarray) -> int:
    vectors = Vectors(array, [""] * len(array), None, {})
    return sum(len(i) for i, _, _ in search.pairs_above(vectors, THRESHOLD))


def faiss_pairs(array: np.ndarray) -> int:
    if len(array) <= search.EXACT_ROWS:
        index = faiss.IndexFlatIP(array.shape[1])
    else:
        lists = round(math.sqrt(len(array)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(array.shape[1]), array.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(array), search.LIST_SAMPLE, replace=False)
        index.train(array[np.sort(sample)])
        index.nprobe = search.PROBES
    index.add(array)
    codes = []
    for start in range(0, len(array), 65536):
        limits, _, ids = index.range_search(array[start : start + 65536], THRESHOLD)
        queries = start + np.repeat(np.arange(len(limits) - 1), np.diff(limits.astype(np.int64)))
        other = queries != ids
        codes.append(np.minimum(queries, ids)[other] * len(array) + np.maximum(queries, ids)[other])
    return len(np.unique(np.concatenate(codes)))  # each pair once, whichever row found it


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    array = generated(args.rows, args.dim)
    result = {
        "host": host_cpu(),
        "rows": args.rows,
        "faiss_version": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
    }
    for name, run in (("byolcli", byolcli_pairs), ("faiss", faiss_pairs)):
        pairs = run(array)  # warm-up
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            run(array)
            times.append(time.perf_counter() - start)
        result[name] = {"seconds": round(statistics.median(times), 2), "pairs": pairs}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
