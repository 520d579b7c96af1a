"""What a run from starting weights exports.

Without labels: the trained weights mixed with the start, every weight `mix` of the way from the start
(weight-space ensembling, WiSE-FT, Wortsman et al. 2022): fine-tuning distorts what pretrained features
know, and the mix keeps part of it. The mix's batch-norm statistics are then measured on the folder's
images, since a mix of two networks does not compute the mix of their statistics (docs/adaptation.md).

With a few labels: the candidates the run passes through, the frozen start (at the run's size, and at
its own where that is known and differs), the start with the folder's statistics, the plan's mix and the
trained weights (both with the folder's statistics), are scored with `byol evaluate`'s kNN and linear
probe. The labelled images are split three ways per class: the probes fit on one part, the choice (and
the probe's L2 strength) is made on the second, and the third scores the choice on images it did not
see. The plan's export stays unless another candidate is clearly better on the choice's part: among
near-equal candidates, the best of a few hundred noisy scores is mostly the luckiest. Choosing may take
a tenth of the run's compute: as many labels are scored as the candidates can embed in what measuring
their statistics and fitting their probes leave of it.
"""

from __future__ import annotations

import copy
import math
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

STATISTICS_ONLY = "start + folder stats"  # the start, untrained, its batch-norm statistics measured on the folder
SCORING_SHARE = 0.1  # of the run's compute, what measuring and scoring the candidates may take
# The fewest forward passes' compute a trained image costs: two views, each forward and backward (a backward
# costs about two forwards) through the online network. The target's passes are left over for the decoding.
TRAINED_IMAGE_FORWARDS = 6
PROBE_FORWARDS = 200  # a candidate's probes cost about as much as this many forward passes (docs/adaptation.md)
CLEAR = 2.0  # how many standard deviations of chance a candidate must beat the plan's export by
# Fewer labelled images of a class than this and its kNN votes and check score say little; scored regardless
# of the time they take.
MIN_SCORED_PER_CLASS = 30
# Images the batch-norm statistics are measured on, at most (a seeded sample): on the three shared sets,
# statistics from this many scored as those from the whole folder (benchmarks/statistics_sample.py).
RECALIBRATION_IMAGES = 256
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


def labels_to_score(trained_images: int, found: list[Candidate], images: int, labelled: LabelledImages) -> int:
    """How many labelled images every candidate in `found` can embed in a tenth of the compute of a run that
    trained on `trained_images` (repeats counted), counted in forward passes: those that measured the
    statistics of `images` and those the probes cost come first, then one per candidate and image (more by
    its pixels at a larger size). Never fewer than MIN_SCORED_PER_CLASS per class, nor more than there are.
    A count, not a timing, so the same run chooses alike on any machine."""
    forwards = SCORING_SHARE * TRAINED_IMAGE_FORWARDS * trained_images - PROBE_FORWARDS * len(found)
    forwards -= min(images, RECALIBRATION_IMAGES) * sum(candidate.statistics == "folder" for candidate in found)
    size = found[0].image_size
    per_image = sum((candidate.image_size / size) ** 2 for candidate in found)
    fewest = min(len(labelled.paths), MIN_SCORED_PER_CLASS * len(labelled.classes))
    return min(len(labelled.paths), max(fewest, int(max(0.0, forwards) / per_image)))


def scored_sample(labelled: LabelledImages, limit: int, seed: int = 0) -> LabelledImages:
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


def score_candidates(
    features: dict[str, torch.Tensor], y: torch.Tensor, classes: int
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Per candidate's features: kNN and linear top-1 on the choose part and on the check part, the
    probes fitted on the fit part (the linear probe's L2 strength chosen on the choose part, as the
    candidate is); and which choose rows each probe got right, (2, rows)."""
    fit, choose, check = three_parts(y)
    held = torch.cat([choose, check])
    scores, hits = {}, {}
    for name, x in features.items():
        votes = knn_scores(x[fit], y[fit], x[held], classes)
        logits, _, _ = linear_probe_scores(x[fit], y[fit], x[held], classes, x[choose], y[choose])
        right = {"knn": votes.argmax(1) == y[held], "linear": logits.argmax(1) == y[held]}
        scores[name] = {
            f"{method}_{part}": round(correct[rows].float().mean().item(), 4)
            for method, correct in right.items()
            for part, rows in (("choose", slice(0, len(choose))), ("check", slice(len(choose), None)))
        }
        hits[name] = torch.stack([right["knn"][: len(choose)], right["linear"][: len(choose)]])
    return scores, hits


def clearly_better(hits: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether the probes right in `hits` beat those in `reference` on the same rows by more than chance:
    a sign test on the rows where they differ (z above CLEAR)."""
    wins, losses = int((hits & ~reference).sum()), int((~hits & reference).sum())
    return wins - losses > CLEAR * math.sqrt(wins + losses)


def best_candidate(scores: dict[str, dict[str, float]], hits: dict[str, torch.Tensor], reference: str) -> str:
    """`reference` (the plan's export), unless candidates are clearly better on the choose part; then, of
    those, the one with the highest mean of kNN and linear top-1 there (of equals, the one listed first:
    the nearer the start)."""
    better = [name for name in scores if name != reference and clearly_better(hits[name], hits[reference])]
    return max(better, key=lambda name: scores[name]["knn_choose"] + scores[name]["linear_choose"], default=reference)


def candidates(
    trained: nn.Module,
    start: dict[str, torch.Tensor],
    start_size: int | None,
    mix: float,
    images: list[Path],
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """The frozen start (also at `start_size` px, where that differs from the run's), then the start, the
    plan's `mix` and the trained weights, each with its batch-norm statistics measured on `images` (the
    folder's), as the plan's export has them."""
    size = metadata_of(trained)["image_size"]
    found = [Candidate("start", 0.0, size, mixed_encoder(trained, start, 0.0))]
    if start_size and start_size != size:
        at_own = attach_metadata(mixed_encoder(trained, start, 0.0), {**metadata_of(trained), "image_size": start_size})
        found.append(Candidate(f"start at {start_size} px", 0.0, start_size, at_own))
    mixes = sorted({0.0, mix, 1.0})
    measured = recalibrated([mixed_encoder(trained, start, m) for m in mixes], images, device, progress)
    names = {0.0: STATISTICS_ONLY, 1.0: "trained"}
    found += [Candidate(names.get(m, f"mix {m:g}"), m, size, net, "folder") for m, net in zip(mixes, measured)]
    return found
