"""What a run from starting weights exports.

Without labels: the trained weights mixed with the start, every weight `mix` of the way from the start
(weight-space ensembling, WiSE-FT, Wortsman et al. 2022): fine-tuning distorts what pretrained features
know, and the mix keeps part of it. The mix's batch-norm statistics are then measured on the folder's
images, since a mix of two networks does not compute the mix of their statistics (docs/adaptation.md).

With a few labels: the candidates the run passes through, from the frozen start (at the run's size,
and at its own where that is known and differs) through the start with the folder's statistics and the
mixes to the trained weights, are scored with
`byol evaluate`'s kNN and linear probe. The labelled images are split three ways per class: the probes fit
on one part, the choice is made on the second, and the third scores the choice on images it did not see.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from byolcli.core.encoder import attach_metadata, metadata_of
from byolcli.core.errors import UserError
from byolcli.core.labels import LabelledImages, drop_missing, read_labels
from byolcli.evaluation.metrics import knn_scores, linear_probe_scores, stratified_folds, stratified_holdout

MIXES = (0.25, 0.5, 0.75, 1.0)  # the mixes scored with labels, besides the start itself
STATISTICS_ONLY = "start + folder stats"  # the start, untrained, its batch-norm statistics measured on the folder
# Labelled images the candidates are scored on, at most: each candidate embeds them all, and past this many
# scoring would cost more than a tenth of a default run on a CPU (benchmarks/README.md).
MAX_SCORED = 2000
# Images the exported mix's batch-norm statistics are measured on, at most: a statistic's error falls as
# 1/sqrt(images), and a forward pass over these costs a small share of the shortest default run.
RECALIBRATION_IMAGES = 2048
PARTS = 3  # fit, choose, check
MIN_PER_CLASS = PARTS


@dataclass
class Candidate:
    name: str
    mix: float  # 0: the start; 1: the trained weights
    image_size: int
    network: nn.Module
    statistics: str = ""  # "folder": its batch-norm statistics measured on the folder's images


def mix_states(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], mix: float) -> dict[str, Any]:
    """start + mix·(trained − start) for every floating-point tensor; counters are the trained ones."""
    return {
        name: torch.lerp(start[name].to(value), value, mix) if value.is_floating_point() else value
        for name, value in trained.items()
    }


def mixed_encoder(trained: nn.Module, start: dict[str, torch.Tensor], mix: float) -> nn.Module:
    """A copy of the `trained` encoder holding the weights `mix` of the way from `start` to its own."""
    encoder = copy.deepcopy(trained)
    encoder.load_state_dict(mix_states(start, trained.state_dict(), mix))
    return encoder


def recalibrated(
    encoders: list[nn.Module],
    images: list[Path],
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
    limit: int = RECALIBRATION_IMAGES,
) -> list[nn.Module]:
    """Copies of `encoders` whose batch-norm statistics are measured afresh, as embedding sees the images,
    on `images` (a seeded sample of `limit` where there are more), each image decoded once for all. A mix of
    two networks' weights does not compute the mix of their activations' statistics: its activations shrink
    toward their mean (Jordan et al. 2023, REPAIR), and the start's statistics were never the folder's."""
    from byolcli.core.inference import iter_shared_embeddings

    if len(images) > limit:
        picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:limit]
        images = [images[i] for i in picked.sort().values.tolist()]
    encoders = [copy.deepcopy(encoder) for encoder in encoders]
    norms = [m for encoder in encoders for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # the plain mean over all batches
    for row, _, ok in iter_shared_embeddings(
        images, [encoder.train() for encoder in encoders], device, precision="fp32"
    ):
        if progress:
            progress(row + len(ok), len(images))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return [encoder.eval() for encoder in encoders]


def read_training_labels(csv_path: Path, images: list[Path]) -> LabelledImages:
    """The labels of `images` (the folder's) that --labels gives, checked before any training: every
    listed file must be one of them, with two classes or more and enough images in each to hold some
    out. UserError otherwise."""
    data = drop_missing(read_labels(csv_path), csv_path, skip_missing=False)
    known = {path.resolve() for path in images}
    outside = [(line, path) for line, path in zip(data.rows, data.paths) if path.resolve() not in known]
    if outside:
        shown = ", ".join(f"line {line}: {path.name}" for line, path in outside[:3])
        raise UserError(
            f"{csv_path}: {len(outside):,} listed images are not among the folder's images ({shown}); "
            "--labels names images of the folder being trained on"
        )
    counts = Counter(data.labels)
    if len(counts) < 2:
        raise UserError(f"{csv_path}: only one class ({next(iter(counts))!r}); choosing needs at least two")
    label, fewest = min(counts.items(), key=lambda item: item[1])
    if fewest < MIN_PER_CLASS:
        raise UserError(
            f"{csv_path}: class {label!r} has {fewest} labelled image{'s' if fewest > 1 else ''}; choosing needs "
            f"{MIN_PER_CLASS} or more per class (to fit the probes, to choose, and to check the choice)"
        )
    return data


def scored_sample(labelled: LabelledImages, limit: int = MAX_SCORED, seed: int = 0) -> LabelledImages:
    """At most `limit` of the labelled images, the same share of every class (seeded)."""
    if len(labelled.paths) <= limit:
        return labelled
    index = {label: i for i, label in enumerate(labelled.classes)}
    y = torch.tensor([index[label] for label in labelled.labels])
    _, kept = stratified_holdout(y, limit / len(y), seed)
    return labelled.subset(sorted(kept.tolist()))


def three_parts(y: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices of the fit, choose and check parts: three stratified folds."""
    part = stratified_folds(y, PARTS, seed)
    fit, choose, check = (torch.nonzero(part == p).flatten() for p in range(PARTS))
    return fit, choose, check


def score_candidates(features: dict[str, torch.Tensor], y: torch.Tensor, classes: int) -> dict[str, dict[str, float]]:
    """Per candidate's features: kNN and linear top-1 on the choose part and on the check part, the
    probes fitted on the fit part."""
    fit, choose, check = three_parts(y)
    held = torch.cat([choose, check])
    scores = {}
    for name, x in features.items():
        votes = knn_scores(x[fit], y[fit], x[held], classes)
        logits, _, _ = linear_probe_scores(x[fit], y[fit], x[held], classes)
        right = {"knn": votes.argmax(1) == y[held], "linear": logits.argmax(1) == y[held]}
        scores[name] = {
            f"{method}_{part}": round(hits[rows].float().mean().item(), 4)
            for method, hits in right.items()
            for part, rows in (("choose", slice(0, len(choose))), ("check", slice(len(choose), None)))
        }
    return scores


def best_candidate(scores: dict[str, dict[str, float]]) -> str:
    """The candidate with the highest mean of kNN and linear top-1 on the choose part; of equals, the one
    listed first (the candidates run from the start toward the trained weights: the nearer the start)."""
    return max(scores, key=lambda name: scores[name]["knn_choose"] + scores[name]["linear_choose"])


def candidates(
    trained: nn.Module,
    start: dict[str, torch.Tensor],
    start_size: int | None,
    images: list[Path],
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """The frozen start (also at `start_size` px, where that differs from the run's), then the start and the
    mixes each with its batch-norm statistics measured on `images` (the folder's), as the plan's export has them."""
    size = metadata_of(trained)["image_size"]
    found = [Candidate("start", 0.0, size, mixed_encoder(trained, start, 0.0))]
    if start_size and start_size != size:
        at_own = attach_metadata(mixed_encoder(trained, start, 0.0), {**metadata_of(trained), "image_size": start_size})
        found.append(Candidate(f"start at {start_size} px", 0.0, start_size, at_own))
    mixes = recalibrated([mixed_encoder(trained, start, mix) for mix in (0.0, *MIXES)], images, device, progress)
    names = [STATISTICS_ONLY] + ["trained" if mix == 1 else f"mix {mix:g}" for mix in MIXES]
    found += [Candidate(name, mix, size, network, "folder") for name, mix, network in zip(names, (0.0, *MIXES), mixes)]
    return found
