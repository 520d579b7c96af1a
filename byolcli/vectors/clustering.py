"""Spherical k-means (k-means on the unit sphere, by cosine similarity) over vectors read a block
at a time, and the rule that picks k when the user does not.

Seeds by k-means++ (Arthur & Vassilvitskii 2007) on a sample, then Lloyd's steps over every row:
memory holds the centroids, one block of rows and one label per row. The rule for k was measured
against a silhouette-chosen k (benchmarks/README.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from byolcli.vectors.store import Vectors, unit

SEED_SAMPLE = 20_000  # rows k-means++ seeds from
MAX_STEPS = 50
# Lloyd's steps stop once fewer rows than this share change group.
SETTLED = 1e-3
MOST_GROUPS = 50


@dataclass
class Clusters:
    centroids: np.ndarray  # k × dim, unit length
    labels: np.ndarray  # group of each row, the largest group 0
    similarity: np.ndarray  # each row's cosine similarity to its group's centroid

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.centroids))


def kmeans(vectors: Vectors, k: int, seed: int = 0) -> Clusters:
    """k groups of the rows by cosine similarity."""
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(vectors), min(len(vectors), SEED_SAMPLE), replace=False))
    centroids = seed_centroids(vectors.unit(vectors.array[sample]), k, rng)
    labels = np.full(len(vectors), -1, dtype=np.int64)
    similarity = np.zeros(len(vectors), dtype=np.float32)
    for _ in range(MAX_STEPS):
        sums = np.zeros_like(centroids, dtype=np.float64)
        changed = 0
        for start, rows in vectors.blocks():
            scores = rows @ centroids.T
            nearest = scores.argmax(1)
            changed += int((labels[start : start + len(rows)] != nearest).sum())
            labels[start : start + len(rows)] = nearest
            similarity[start : start + len(rows)] = scores[np.arange(len(rows)), nearest]
            sums += np.eye(k, dtype=np.float32)[nearest].T @ rows
        empty = np.flatnonzero(np.linalg.norm(sums, axis=1) == 0)
        # A group left empty restarts at the rows its centroid fits worst.
        if len(empty):
            worst = np.sort(np.argsort(similarity)[: len(empty)])
            sums[empty] = vectors.unit(vectors.array[worst])
        centroids = unit(sums)
        if changed <= SETTLED * len(vectors):
            break
    # Number the groups by size, the largest first.
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return Clusters(centroids[order], rank[labels], similarity)


def seed_centroids(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ on unit rows, with 1 − cosine as the distance."""
    chosen = [int(rng.integers(len(rows)))]
    distance = 1 - rows @ rows[chosen[0]]
    for _ in range(1, k):
        weights = np.clip(distance, 0, None) ** 2
        total = weights.sum()
        pick = int(rng.choice(len(rows), p=weights / total)) if total > 0 else int(rng.integers(len(rows)))
        chosen.append(pick)
        distance = np.minimum(distance, 1 - rows @ rows[pick])
    centroids: np.ndarray = rows[chosen].copy()
    return centroids


def choose_k(rows: int) -> int:
    """How many groups when the user does not say: √(rows / 2) (a rule of thumb, Mardia et al. 1979),
    at least 2 and at most MOST_GROUPS, a page's worth."""
    return max(2, min(MOST_GROUPS, round(math.sqrt(rows / 2)), rows))
