"""Did training help, without labels: an encoder beside the network it started from (when its training
started from weights) or a random-init network of the same architecture, on a seeded sample of a
folder's images. Both get the label-free measures (label_free.py) and the same nearest-neighbour
gallery; `byol train` writes the result into its run folder as report.html, `byol evaluate FOLDER`
for any folder and encoder."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from byolcli.core.encoder import metadata_of
from byolcli.core.inference import embed_many
from byolcli.core.inputs import RANDOM_INIT, START
from byolcli.core.start import random_init_network, start_network
from byolcli.evaluation.label_free import alignment, nearest, rankme, uniformity, view_retrieval
from byolcli.vectors.duplicates import find_duplicates
from byolcli.vectors.store import Vectors

SAMPLE = 2000  # images the measures and the neighbour search use: the page and the time stay bounded
# Images whose two augmented views measure alignment and view retrieval: among 256, retrieval was too coarse to
# rank encoders as kNN does; among 1,000 it mostly does (docs/experiments.md).
VIEW_PAIRS = 1000
QUERIES = 12
NEIGHBOURS = 6
ENCODER = "encoder"

# What each measure says and how to read it, as measured against kNN on labels (benchmarks/README.md): view
# retrieval and alignment rank checkpoints and runs as kNN does, RankMe and uniformity do not, and none of them
# compares fairly with a random-init network, whose embeddings crowd into a narrow cone whether training helped.
MEANINGS = {
    "rankme": "effective rank of the embeddings (RankMe): how many directions the images use; near 1 is collapse, "
    "otherwise not a verdict (trained encoders score above random init even when worse)",
    "alignment": "mean squared distance between two augmented views of an image (0–4); lower is better between "
    "runs, not against random init",
    "uniformity": "log mean exp(−2·distance²) over image pairs (0 down to about −4); lower spreads the images more "
    "evenly",
    "view_retrieval": f"share of up to {VIEW_PAIRS:,} images whose second augmented view is, of all their second "
    "views, the nearest to the first (chance: 1 in their number); higher is better between runs",
    "near_duplicate_share": "share of images with a near-duplicate in the sample, as byol duplicates finds them",
}
VERDICTS = {
    RANDOM_INIT: "Compare runs or checkpoints with these; whether training beat an untrained network takes labels: "
    "byol evaluate --labels on a few hundred labelled images.",
    # Measured on the three labelled sets against kNN and the linear probe (docs/adaptation.md).
    START: "These measures do not say whether the encoder is better than the weights it started from: measured "
    "against labels, none of them ever flagged an encoder that scored below its start (RankMe and uniformity "
    "called every adapted encoder better). Labels can: byol evaluate --labels, or byol train --labels to export "
    "whichever is better.",
}


@dataclass
class Judgement:
    reference: str  # what the encoder is compared with: RANDOM_INIT, or START (the weights it started from)
    paths: list[Path]  # the sample, in row order
    queries: list[int]  # rows of the gallery's query images
    neighbours: dict[str, torch.Tensor]  # per encoder: (queries, NEIGHBOURS) rows
    measures: dict[str, dict[str, float]]  # per encoder: rankme, alignment, uniformity, near_duplicate_share
    duplicates: list[tuple[int, int, float]]  # near-duplicate pairs under the encoder

    def to_dict(self, root: Path) -> dict[str, Any]:
        def name(row: int) -> str:
            path = self.paths[row]
            return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

        return {
            "images": len(self.paths),
            "reference": self.reference,
            "measures": self.measures,
            "meanings": MEANINGS,
            "how_to_read": VERDICTS[self.reference],
            "near_duplicates": [{"a": name(i), "b": name(j), "cosine": round(s, 4)} for i, j, s in self.duplicates],
            "neighbours": {
                who: {name(q): [name(int(r)) for r in rows] for q, rows in zip(self.queries, found)}
                for who, found in self.neighbours.items()
            },
        }


def sample_paths(paths: list[Path], size: int = SAMPLE, seed: int = 0) -> list[Path]:
    """A seeded sample of at most `size` paths, in their original order."""
    if len(paths) <= size:
        return list(paths)
    chosen = sorted(random.Random(seed).sample(range(len(paths)), size))
    return [paths[i] for i in chosen]


def judge(
    paths: list[Path],
    encoder: torch.nn.Module,
    device: torch.device,
    progress: Callable[..., AbstractContextManager[Callable[[int, int], None]]] | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> Judgement:
    """Embed a seeded sample of `paths` with `encoder` and with the network it started from (its random-init
    twin when it started from random weights, or when its start cannot be had), and measure both."""
    sample = sample_paths(paths, SAMPLE, seed)
    start, _ = start_network(metadata_of(encoder), device)
    reference = RANDOM_INIT if start is None else START
    networks = {
        ENCODER: encoder,
        reference: random_init_network(metadata_of(encoder), device) if start is None else start,
    }
    measures: dict[str, Any] = {}
    with progress(f"embedding a sample ({', '.join(networks)})", unit="images") if progress else nullcontext() as step:
        features, ok = embed_many(sample, networks, device, 256, workers, step)
    features = {who: f[torch.from_numpy(ok)] for who, f in features.items()}
    keep = [p for p, good in zip(sample, ok) if good]
    queries = sorted(random.Random(seed).sample(range(len(keep)), min(QUERIES, len(keep))))
    views = view_embeddings(keep, networks, metadata_of(encoder)["image_size"], device, seed, progress)
    neighbours: dict[str, torch.Tensor] = {}
    duplicates: list[tuple[int, int, float]] = []
    for who in networks:
        found = duplicate_pairs(features[who], keep)
        duplicates = found if who == ENCODER else duplicates
        first, second = views[who]
        measures[who] = {
            "rankme": round(rankme(features[who]), 2),
            "alignment": round(alignment(first, second), 4),
            "uniformity": round(uniformity(features[who]), 4),
            "view_retrieval": round(view_retrieval(first, second), 4),
            "near_duplicate_share": round(len({row for pair in found for row in pair[:2]}) / max(len(keep), 1), 4),
        }
        neighbours[who] = nearest(features[who], torch.tensor(queries), NEIGHBOURS)[0]
    return Judgement(reference, keep, queries, neighbours, measures, duplicates)


def duplicate_pairs(features: torch.Tensor, paths: list[Path]) -> list[tuple[int, int, float]]:
    """(kept row, row, cosine) for each image of a near-duplicate group but the group's kept one."""
    vectors = Vectors(features.numpy(), [str(path) for path in paths], None, {}).centred()
    return [
        (group.rows[0], row, similarity)
        for group in find_duplicates(vectors)
        for row, similarity in zip(group.rows[1:], group.similarity[1:])
    ]


def view_embeddings(
    paths: list[Path],
    networks: dict[str, torch.nn.Module],
    image_size: int,
    device: torch.device,
    seed: int,
    progress: Callable[..., AbstractContextManager[Callable[[int, int], None]]] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two views each of a seeded sample of the images, made by byolcli's training augmentation, embedded
    by every network (all are judged on the same views): per network, both views' rows, row i of each
    from image i. Views are made a chunk at a time, so memory stays bounded at any image size."""
    from byolcli.core.views import TwoViewDataset

    dataset = TwoViewDataset(sample_paths(paths, VIEW_PAIRS, seed), image_size, seed)
    rows: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {who: ([], []) for who in networks}
    with progress("embedding augmented views", unit="images") if progress else nullcontext() as step:
        with torch.inference_mode():
            for start in range(0, len(dataset), 64):
                pairs = [dataset[0, i] for i in range(start, min(start + 64, len(dataset)))]
                views = [torch.stack(view).to(device) for view in zip(*pairs)]
                for who, network in networks.items():
                    for embedded, view in zip(rows[who], views):
                        embedded.append(network(view).float())
                if step:
                    step(start + len(pairs), len(dataset))
    return {who: (torch.cat(first), torch.cat(second)) for who, (first, second) in rows.items()}
