"""`byol similar`: for each query image, the k most cosine-similar images of the folder.

A query is an image of the folder (its path as listed, or the file itself), or any other image
file, which is then embedded with the encoder that made the vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from byolcli.core.errors import UserError
from byolcli.vectors.search import top_k
from byolcli.vectors.store import Vectors

if TYPE_CHECKING:
    from byolcli.core.model_choice import ModelChoice


def query_rows(vectors: Vectors, queries: list[Path]) -> tuple[np.ndarray, list[Path]]:
    """Each query's row in the vectors (-1 where it is not one of them), and the queries that are not."""
    row_of = {name: row for row, name in enumerate(vectors.paths)}
    if vectors.root is not None:
        root = vectors.root.resolve()
        row_of.update({str(root / name): row for row, name in enumerate(vectors.paths)})
    rows = np.array(
        [row_of.get(str(q), row_of.get(str(q.resolve()) if q.exists() else "", -1)) for q in queries], dtype=np.int64
    )
    return rows, [q for q, row in zip(queries, rows) if row < 0]


def embed_queries(files: list[Path], choice: ModelChoice, device: str | None) -> np.ndarray:
    """Vectors of image files outside the vectors, by the encoder that made them."""
    from byolcli.core.images import open_rgb
    from byolcli.core.inference import embed_paths, pick_device

    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: not found, and not a path in the vectors")
        try:
            open_rgb(file)
        except Exception as exc:  # noqa: BLE001 - whatever Pillow raises, the file is not an image it can read
            raise UserError(f"{file}: not an image ({type(exc).__name__}: {exc})") from None
    torch_device = pick_device(device)
    features, _ = embed_paths(files, choice.load(torch_device), torch_device, batch_size=64, workers=0)
    result: np.ndarray = features.numpy()
    return result


def similar(
    vectors: Vectors, queries: list[Path], k: int, choice: ModelChoice | None, device: str | None = None
) -> list[dict[str, Any]]:
    """For each query: its k nearest rows, most similar first, as {"query", "row", "neighbours"}."""
    rows, outside = query_rows(vectors, queries)
    room = len(vectors) - (1 if (rows >= 0).any() else 0)
    if k > room:
        raise UserError(f"-k {k}: larger than the {room:,} other images there are to find")
    embedded: dict[Path, np.ndarray] = {}
    if outside:
        if choice is None:
            raise UserError(
                f"{outside[0]}: not one of the vectors' images, and the encoder that made them is unknown "
                "(give the folder, or --model, to embed it)"
            )
        embedded = dict(zip(outside, vectors.unit(embed_queries(outside, choice, device))))
    matrix = np.stack([vectors.unit_rows(r, r + 1)[0] if r >= 0 else embedded[q] for q, r in zip(queries, rows)])
    found, similarity = top_k(vectors, matrix, k, exclude=rows)
    return [
        {
            "query": str(query),
            "row": int(row) if row >= 0 else None,
            "neighbours": [
                {"row": int(n), "path": vectors.paths[n], "similarity": round(float(s), 4)} for n, s in zip(near, sims)
            ],
        }
        for query, row, near, sims in zip(queries, rows, found, similarity)
    ]
