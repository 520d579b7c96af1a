"""Exact cosine search over vectors too many to compare all at once: the rows are read a block at
a time, so memory holds the queries, one block of rows and the answers, never rows × rows."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from byolcli.vectors.store import BLOCK, Vectors

# Up to this many rows pairs are found by comparing every row with every other; beyond, through
# inverted lists, which miss a few (measured: benchmarks/README.md).
EXACT_ROWS = 50_000
PROBES = 5  # lists each row is compared with
LIST_SAMPLE = 65_536  # rows the lists' centroids are fitted on


def top_k(
    vectors: Vectors, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows most cosine-similar to each unit-length query: (rows, similarities), each
    queries × k, most similar first. `exclude[q]`, where given and not -1, is a row query q must
    not find (itself)."""
    best_rows = np.full((len(queries), k), -1, dtype=np.int64)
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for start, rows in vectors.blocks():
        similarity = queries @ rows.T
        if exclude is not None:
            mine = (exclude >= start) & (exclude < start + len(rows))
            similarity[np.flatnonzero(mine), exclude[mine] - start] = -np.inf
        ids = np.broadcast_to(np.arange(start, start + len(rows)), similarity.shape)
        merged = np.concatenate([best, similarity], axis=1)
        merged_rows = np.concatenate([best_rows, ids], axis=1)
        keep = np.argpartition(-merged, k - 1, axis=1)[:, :k] if merged.shape[1] > k else np.indices(merged.shape)[1]
        best = np.take_along_axis(merged, keep, axis=1)
        best_rows = np.take_along_axis(merged_rows, keep, axis=1)
    order = np.argsort(-best, axis=1, kind="stable")
    return np.take_along_axis(best_rows, order, axis=1), np.take_along_axis(best, order, axis=1)


def pairs_above(vectors: Vectors, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pairs of rows i < j with cosine similarity of at least `threshold`, as arrays (i, j, similarity)
    a block at a time: every such pair up to EXACT_ROWS rows, beyond that those the inverted lists find."""
    if len(vectors) > EXACT_ROWS:
        yield from _listed_pairs_above(vectors, threshold)
        return
    for start, rows in vectors.blocks():
        for other_start in range(start, len(vectors), BLOCK):
            similarity = rows @ vectors.unit_rows(other_start, other_start + BLOCK).T
            i, j = np.nonzero(similarity >= threshold)
            later = i + start < j + other_start
            i, j = i[later], j[later]
            yield i + start, j + other_start, similarity[i, j]


def _listed_pairs_above(
    vectors: Vectors, threshold: float, probes: int = PROBES
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Inverted lists (Sivic & Zisserman 2003; the IVF of faiss): k-means on a sample puts every row in
    the list of its nearest centroid; each row is compared with the rows listed under its `probes`
    nearest centroids. Rows that close are almost always listed within each other's nearest few."""
    from byolcli.vectors.clustering import kmeans

    rng = np.random.default_rng(0)
    lists = max(2, round(math.sqrt(len(vectors))))
    sample = np.sort(rng.choice(len(vectors), min(len(vectors), LIST_SAMPLE), replace=False))
    held = vectors.unit(vectors.array[sample])
    centroids = kmeans(Vectors(held, [""] * len(held), None, {}), lists).centroids
    nearest = np.zeros((len(vectors), probes), dtype=np.int64)
    for start, rows in vectors.blocks():
        scores = rows @ centroids.T
        nearest[start : start + len(rows)] = np.argsort(-scores, axis=1)[:, :probes]
    listed_rows, list_bounds = _inverted(nearest[:, 0], lists)
    asked_rows, ask_bounds = _inverted(nearest.ravel(), lists)
    asked_rows //= probes  # positions in the flattened probes back to rows
    for listed in range(lists):
        members = listed_rows[list_bounds[listed] : list_bounds[listed + 1]]
        queries = asked_rows[ask_bounds[listed] : ask_bounds[listed + 1]]
        if not len(members) or not len(queries):
            continue
        base = vectors.unit(vectors.array[members])
        for start in range(0, len(queries), BLOCK):
            asking = queries[start : start + BLOCK]
            similarity = vectors.unit(vectors.array[asking]) @ base.T
            q, m = np.nonzero(similarity >= threshold)
            i, j = asking[q], members[m]
            # Each pair once: asked by its earlier row, or by its later row where the earlier row does
            # not ask the later row's list.
            reverse_asked = (nearest[j] == nearest[i, 0][:, None]).any(1)
            keep = (i < j) | ((i > j) & ~reverse_asked)
            yield np.minimum(i, j)[keep], np.maximum(i, j)[keep], similarity[q, m][keep]


def _inverted(list_of: np.ndarray, lists: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions sorted by list, and where each list's positions start and end."""
    order = np.argsort(list_of, kind="stable")
    return order, np.searchsorted(list_of[order], np.arange(lists + 1))
