"""`byol select`: which images to label first.

Two ways to choose, both by cosine distance between vectors:
- spread: k-center greedy (Sener & Savarese 2018). Each next image is the one farthest from every
  image chosen or labelled so far, so the choice covers the folder, outliers included.
- typical: TypiClust (Hacohen et al. 2022). Group the folder into as many k-means groups as there will
  be labelled images; from each of the largest groups without a labelled image take its most typical
  member, the one whose nearest neighbours are closest. Small budgets learn more from typical
  images than from outliers.
"""

from __future__ import annotations

import numpy as np

from byolcli.vectors.clustering import kmeans
from byolcli.vectors.search import top_k
from byolcli.vectors.store import BLOCK, Vectors, unit

STRATEGIES = ("typical", "spread")
# Neighbours that measure how typical an image is (Hacohen et al. use 20).
TYPICALITY_NEIGHBOURS = 20


def spread(vectors: Vectors, n: int, labelled: np.ndarray) -> list[int]:
    """k-center greedy: n rows, each the farthest (by cosine) from the rows chosen or labelled before.
    Without labelled rows it starts at the row nearest the mean direction."""
    distance = np.full(len(vectors), np.inf, dtype=np.float32)
    if len(labelled):
        for start in range(0, len(labelled), BLOCK):
            _update(vectors, distance, vectors.unit(vectors.array[np.sort(labelled[start : start + BLOCK])]))
        first = int(distance.argmax())
    else:
        mean = unit(sum(rows.sum(0, keepdims=True) for _, rows in vectors.blocks()))
        first = int(np.concatenate([rows @ mean[0] for _, rows in vectors.blocks()]).argmax())
    chosen = [first]
    _update(vectors, distance, vectors.unit_rows(first, first + 1))
    while len(chosen) < n:
        chosen.append(int(distance.argmax()))
        _update(vectors, distance, vectors.unit_rows(chosen[-1], chosen[-1] + 1))
    return chosen


def _update(vectors: Vectors, distance: np.ndarray, centres: np.ndarray) -> None:
    """Lower each row's distance to its nearest centre with these centres."""
    for start, rows in vectors.blocks():
        nearest = 1 - (rows @ centres.T).max(1)
        np.minimum(distance[start : start + len(rows)], nearest, out=distance[start : start + len(rows)])


def typical(vectors: Vectors, n: int, labelled: np.ndarray, seed: int = 0) -> list[int]:
    """TypiClust: the most typical image of each of the n largest groups that no labelled image is in."""
    clusters = kmeans(vectors, n + len(labelled), seed)
    covered = set(clusters.labels[labelled].tolist())
    is_labelled = np.zeros(len(vectors), dtype=bool)
    is_labelled[labelled] = True
    sizes = clusters.sizes
    order = [g for g in np.argsort(-sizes, kind="stable").tolist() if g not in covered and sizes[g]]
    chosen: list[int] = []
    for group in order:
        members = np.flatnonzero((clusters.labels == group) & ~is_labelled)
        if len(members):
            chosen.append(most_typical(vectors, members, seed))
        if len(chosen) == n:
            return chosen
    # Fewer non-empty free groups than n (duplicates collapse groups): spread over the rest.
    return chosen + spread(vectors, n - len(chosen), np.concatenate([labelled, chosen]).astype(np.int64))


def most_typical(vectors: Vectors, members: np.ndarray, seed: int) -> int:
    """The member with the highest typicality: the inverse mean distance to its nearest neighbours
    among the group (a seeded sample of a block of them, in large groups)."""
    if len(members) > BLOCK:
        members = np.sort(np.random.default_rng(seed).choice(members, BLOCK, replace=False))
    rows = vectors.unit(vectors.array[members])
    group = Vectors(rows, [""] * len(rows), None, {})
    neighbours = min(TYPICALITY_NEIGHBOURS, len(rows) - 1)
    if neighbours < 1:
        return int(members[0])
    _, similarity = top_k(group, rows, neighbours, exclude=np.arange(len(rows)))
    typicality = 1 / np.maximum(1 - similarity.mean(1), 1e-6)
    return int(members[typicality.argmax()])


def select(vectors: Vectors, n: int, labelled: np.ndarray, strategy: str = "typical", seed: int = 0) -> list[int]:
    return spread(vectors, n, labelled) if strategy == "spread" else typical(vectors, n, labelled, seed)
