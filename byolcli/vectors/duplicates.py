"""`byol duplicates`: groups of images that are the same picture: byte-identical files (by size,
then SHA-256), then pairs whose vectors are at least THRESHOLD cosine-similar and whose pixels agree
(pixel_check.py), joined into connected groups (two images that are each a near-duplicate of a third
share its group)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from byolcli.core.errors import UserError
from byolcli.core.files import file_sha256
from byolcli.core.names import escape_name
from byolcli.vectors.pixel_check import SAME_PICTURE, Thumbprints
from byolcli.vectors.search import pairs_above
from byolcli.vectors.store import Vectors

# Chosen on planted copies (re-encoded, resized, cropped, flipped, recoloured): benchmarks/README.md.
THRESHOLD = 0.7


@dataclass
class DuplicateGroup:
    rows: list[int]  # the kept image first: the largest file
    similarity: list[float]  # each row's cosine similarity to the kept image (1 for identical bytes)
    identical: bool  # every file has the same bytes


def require_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold {threshold}: must be above 0 and at most 1 (a cosine similarity)")


def identical_files(vectors: Vectors) -> list[list[int]]:
    """Rows whose files have the same bytes, in groups of two or more (files that cannot be read
    are left out)."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for row in range(len(vectors)):
        try:
            by_size[vectors.file(row).stat().st_size].append(row)
        except OSError:
            continue
    groups = []
    for rows in by_size.values():
        if len(rows) < 2:
            continue
        by_hash: dict[str, list[int]] = defaultdict(list)
        for row in rows:
            try:
                by_hash[file_sha256(vectors.file(row))].append(row)
            except OSError:
                continue
        groups += [same for same in by_hash.values() if len(same) > 1]
    return groups


def find_duplicates(vectors: Vectors, threshold: float = THRESHOLD, pixel_check: bool = True) -> list[DuplicateGroup]:
    """Groups of byte-identical or near-duplicate images, largest group first. Without `pixel_check`,
    or where an image cannot be read, the vectors alone decide."""
    parent = np.arange(len(vectors))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    identical = identical_files(vectors)
    for same in identical:
        for row in same[1:]:
            join(same[0], row)
    prints = Thumbprints()
    for i, j, _ in pairs_above(vectors, threshold):
        if pixel_check and len(i):
            score = prints.agreement([vectors.file(r) for r in i.tolist()], [vectors.file(r) for r in j.tolist()])
            agree = ~(score < SAME_PICTURE)  # unreadable images (NaN) are left to the vectors
            i, j = i[agree], j[agree]
        for a, b in zip(i.tolist(), j.tolist()):
            join(a, b)

    roots = np.array([root(row) for row in range(len(vectors))], dtype=np.int64)
    members: dict[int, list[int]] = defaultdict(list)
    for row in np.flatnonzero(np.bincount(roots, minlength=len(vectors))[roots] > 1).tolist():
        members[int(roots[row])].append(row)
    identical_sets = {frozenset(same) for same in identical}
    groups = []
    for rows in members.values():
        rows = sorted(rows, key=lambda row: (-_size(vectors, row), row))
        kept = vectors.unit_rows(rows[0], rows[0] + 1)[0]
        similarity = (np.stack([vectors.unit_rows(r, r + 1)[0] for r in rows]) @ kept).tolist()
        same_bytes = frozenset(rows) in identical_sets
        groups.append(DuplicateGroup(rows, [1.0] * len(rows) if same_bytes else similarity, same_bytes))
    return sorted(groups, key=lambda group: (-len(group.rows), group.rows[0]))


def _size(vectors: Vectors, row: int) -> int:
    try:
        return vectors.file(row).stat().st_size
    except OSError:
        return 0


def groups_csv(vectors: Vectors, groups: list[DuplicateGroup]) -> str:
    """`group,path,similarity`, one line per image, the kept image first in each group."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["group", "path", "similarity"])
    for number, group in enumerate(groups, 1):
        for row, similarity in zip(group.rows, group.similarity):
            writer.writerow([number, escape_name(vectors.paths[row]), f"{similarity:.4f}"])
    return buffer.getvalue()
