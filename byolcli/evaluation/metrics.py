"""Scoring frozen features against labels: weighted kNN and a linear probe, in torch.

Both run on whatever device the features are on, in chunks, so 100,000+
labelled rows fit. Conventions follow the self-supervised literature: weighted
kNN with k=20, T=0.07 on cosine similarity (Wu et al. 2018), and multinomial
logistic regression on standardised frozen features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from byolcli.evaluation.logistic import fit_logistic

K = 20
TEMPERATURE = 0.07
# L2 strengths on the summed squared weights against the mean loss, in half-decades: wide enough that a
# choice at either end is rare, and said when it happens (benchmarks/probe_vs_sklearn.py).
WEIGHT_DECAYS = tuple(10.0 ** (e / 2) for e in range(-14, 5))
FEW_ROWS = 2000  # up to this many training rows, the strength is chosen by stratified k-fold, not one hold-out
# Inner folds: with more rows each check fold is larger and less noisy, while the time grows with rows × folds.
FOLDS, FOLDS_ABOVE, MANY_ROWS = 5, 3, 1000
# L-BFGS steps of the fits that only rank the strengths; the final fit takes its full 100.
SEARCH_ITERATIONS = 50
CHUNK = 4096


def knn_scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    classes: int,
    k: int = K,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """Class votes (n_test, classes): each of the k most similar training rows votes exp(sim / T)."""
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    votes = []
    for start in range(0, len(test_x), CHUNK):
        query = F.normalize(test_x[start : start + CHUNK].float(), dim=1)
        similarity, index = (query @ train.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes.append(torch.zeros(len(query), classes, device=query.device).scatter_add_(1, train_y[index], weights))
    return torch.cat(votes)


def linear_probe_scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    classes: int,
    val_x: torch.Tensor | None = None,
    val_y: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, float, bool]:
    """Logits for `test_x`, the L2 strength chosen, and whether it sits at an end of the grid.

    The strength is chosen on `val_x` when given; else, with few training rows, by stratified
    k-fold cross-validation over them (one hold-out of a few hundred rows is a noisy judge); else on
    a stratified 20%. The test rows never influence it. The final model is fitted on all training rows.
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)

    def standard(t: torch.Tensor) -> torch.Tensor:
        return (t.float() - mean) / std

    if val_x is not None and val_y is not None and len(val_x):
        splits = [(train_x, train_y, val_x, val_y)]
    elif len(train_y) <= FEW_ROWS and (smallest := int(present_counts(train_y).min())) >= 2:
        folds = min(FOLDS if len(train_y) <= MANY_ROWS else FOLDS_ABOVE, smallest)
        fold = stratified_folds(train_y, folds, seed)
        splits = [
            (train_x[fold != f], train_y[fold != f], train_x[fold == f], train_y[fold == f]) for f in range(folds)
        ]
    else:
        fit_index, val_index = stratified_holdout(train_y, 0.2, seed)
        splits = [(train_x[fit_index], train_y[fit_index], train_x[val_index], train_y[val_index])]
    best = choose_weight_decay([(standard(a), standard(c), b, d) for a, b, c, d in splits], classes)
    w, b = fit_logistic(standard(train_x), train_y, classes, [best])
    return standard(test_x) @ w[0] + b[0], best, best in (WEIGHT_DECAYS[0], WEIGHT_DECAYS[-1])


def choose_weight_decay(
    splits: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], classes: int
) -> float:
    """The grid's L2 strength with the best summed accuracy over the (fit x, check x, fit y, check y)
    splits; every strength of a split is fitted in one batch."""
    accuracy = torch.zeros(len(WEIGHT_DECAYS))
    for fit_x, check_x, fit_y, check_y in splits:
        w, b = fit_logistic(fit_x, fit_y, classes, WEIGHT_DECAYS, SEARCH_ITERATIONS)
        accuracy += ((check_x @ w + b[:, None]).argmax(-1) == check_y).float().mean(1).cpu()
    return float(max(zip(accuracy.tolist(), WEIGHT_DECAYS))[1])  # ties: the stronger regulariser


def present_counts(y: torch.Tensor) -> torch.Tensor:
    """Rows per class, for the classes that have any."""
    counts = torch.bincount(y)
    return counts[counts > 0]


def stratified_holdout(y: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split row indices so each class with ≥ 2 rows puts about `share` of them (≥ 1) aside."""
    generator = torch.Generator().manual_seed(seed)
    keep, aside = [], []
    for label in torch.unique(y):
        rows = (y == label).nonzero().flatten().cpu()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_aside = 0 if len(rows) < 2 else max(1, round(len(rows) * share))
        aside.append(rows[:n_aside])
        keep.append(rows[n_aside:])
    return torch.cat(keep).to(y.device), torch.cat(aside).to(y.device)


def stratified_folds(y: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """Fold number per row: each class spread evenly over the folds."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    offset = 0
    for label in torch.unique(y):
        rows = (y == label).nonzero().flatten().cpu()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        fold[rows] = (torch.arange(len(rows)) + offset) % folds
        offset += len(rows)
    return fold.to(y.device)


def summarize(scores: torch.Tensor, y: torch.Tensor, classes: int) -> dict[str, Any]:
    """top-1, top-5 (when there are more than 5 classes), balanced accuracy, per-class recall."""
    predicted = scores.argmax(1)
    result: dict[str, Any] = {"top1": (predicted == y).float().mean().item()}
    if classes > 5:
        top5 = scores.topk(5, dim=1).indices
        result["top5"] = (top5 == y[:, None]).any(1).float().mean().item()
    recall = []
    for c in range(classes):
        rows = y == c
        recall.append((predicted[rows] == c).float().mean().item() if rows.any() else float("nan"))
    present = [r for r in recall if r == r]
    result["balanced"] = sum(present) / len(present)
    result["per_class_recall"] = recall
    result["confusion"] = (
        torch.bincount(y * classes + predicted, minlength=classes * classes).reshape(classes, classes).tolist()
    )
    return result
