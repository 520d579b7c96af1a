"""`byol evaluate`: how good are the embeddings on the user's labels, and did training help?

The labelled images are embedded with the encoder, with the network its training
started from when that was not random (what the user had without training), and
with a random-init encoder of the same architecture (the floor any training must
clear), then scored with weighted kNN and a linear probe, either on the CSV's split column
(train rows fit, test rows score), by stratified k-fold cross-validation, or, past HOLDOUT_ABOVE
rows, on one stratified hold-out.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from byolcli.core.encoder import metadata_of
from byolcli.core.errors import UserError
from byolcli.core.files import atomic_write_text
from byolcli.core.inference import embed_many, pick_device
from byolcli.core.inputs import IMAGENET, RANDOM, RANDOM_INIT, is_start_column, start_column, start_column_size
from byolcli.core.labels import LabelledImages, drop_missing, read_labels, repeated_warning
from byolcli.core.model_choice import choose_model
from byolcli.core.start import random_init_network, start_command, start_network, trained_size
from byolcli.evaluation.metrics import knn_scores, linear_probe_scores, stratified_folds, stratified_holdout, summarize
from byolcli.vectors.store import model_of, open_vectors

if TYPE_CHECKING:
    from byolcli.core.terminal import Reporter

MAX_FOLDS = 5
# Past this many labelled rows without a split column, one stratified hold-out replaces the k folds: its
# test part alone holds over a thousand images, and k folds would fit every probe k times (benchmarks/README.md).
HOLDOUT_ABOVE = 5000
HOLDOUT_SHARE = 0.2


@dataclass
class Protocol:
    """Which rows train and which score: one split, or k folds."""

    name: str
    folds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # (train, test, val) row indices


def make_protocol(data: LabelledImages, y: torch.Tensor, csv_path: Path) -> Protocol:
    counts = Counter(data.labels)
    if len(counts) < 2:
        raise UserError(f"{csv_path}: only one class ({next(iter(counts))!r}); evaluation needs at least two")
    lonely = [label for label, n in counts.items() if n < 2]
    if lonely:
        line = data.rows[data.labels.index(lonely[0])]
        raise UserError(
            f"{csv_path}: line {line}: class {lonely[0]!r} has only one image; every class needs two or more"
        )
    if data.splits is not None:
        split = np.array(data.splits)
        train, val, test = (torch.from_numpy(np.flatnonzero(split == s)) for s in ("train", "val", "test"))
        if len(test) == 0 and len(val):
            test, val = val, torch.empty(0, dtype=torch.long)
        if len(train) == 0 or len(test) == 0:
            raise UserError(f"{csv_path}: the split column needs both train and test (or val) rows")
        name = (
            f"split column: {len(train):,} train"
            + (f", {len(val):,} val" if len(val) else "")
            + f", {len(test):,} test"
        )
        return Protocol(name, [(train, test, val if len(val) else None)])
    if len(y) > HOLDOUT_ABOVE:
        fit, test = stratified_holdout(y, HOLDOUT_SHARE, seed=0)
        return Protocol(
            f"stratified hold-out: {len(fit):,} fit, {len(test):,} test (no split column)", [(fit, test, None)]
        )
    k = min(MAX_FOLDS, min(counts.values()))
    fold = stratified_folds(y, k)
    folds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = [
        ((fold != f).nonzero().flatten(), (fold == f).nonzero().flatten(), None) for f in range(k)
    ]
    return Protocol(f"{k}-fold stratified cross-validation over {len(y):,} images (no split column)", folds)


def score(features: torch.Tensor, y: torch.Tensor, classes: int, protocol: Protocol) -> dict[str, Any]:
    """kNN and linear-probe results, pooled over the protocol's test rows."""
    features = features.float()
    knn_votes, linear_logits, tested = [], [], []
    decays, at_edge = [], False
    for train, test, val in protocol.folds:
        knn_votes.append(knn_scores(features[train], y[train], features[test], classes))
        logits, decay, edge = linear_probe_scores(
            features[train],
            y[train],
            features[test],
            classes,
            *((features[val], y[val]) if val is not None else (None, None)),
        )
        linear_logits.append(logits)
        decays.append(decay)
        at_edge |= edge
        tested.append(test)
    truth = y[torch.cat(tested)]
    linear = summarize(torch.cat(linear_logits), truth, classes)
    linear["weight_decay"] = decays
    linear["weight_decay_at_grid_edge"] = at_edge
    return {"knn": summarize(torch.cat(knn_votes), truth, classes), "linear": linear}


def load_baseline(baseline: Path, metadata: dict[str, Any] | None, device: torch.device) -> torch.nn.Module:
    """--baseline: an encoder file, or 'imagenet' (unless a file has that name): torchvision's weights for
    the evaluated encoder's architecture, at the size they were trained at, where pretrained networks
    score higher than on small images (docs/experiments.md)."""
    if str(baseline) == IMAGENET and not baseline.exists():
        if metadata is None:
            raise UserError("--baseline imagenet: the embeddings' encoder is unknown, so is its architecture")
        return choose_model(IMAGENET, metadata["architecture"]).load(device)
    return choose_model(baseline).load(device)


def embeddings_model(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata of the model that made a `byol embed` output, where it can still be known."""
    choice = model_of(meta)
    return choice.metadata if choice is not None else None


def load_embeddings(vectors_path: Path, data: LabelledImages) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
    """Rows of an earlier `byol embed` output for the CSV's images (via its paths and meta files)."""
    from byolcli.core.embed import sidecars

    vectors = open_vectors(vectors_path)
    if vectors.root is None:
        raise UserError(
            f"{sidecars(vectors_path)['meta']}: not found (--embeddings needs the .npy with the files "
            "`byol embed` writes beside it)"
        )
    root = vectors.root
    row_of = {str((root / name).resolve()): i for i, name in enumerate(vectors.paths)}
    rows = np.array([row_of.get(str(p.resolve()), -1) for p in data.paths])
    good = rows >= 0
    features = np.zeros((len(rows), vectors.array.shape[1]), dtype=np.float32)
    features[good] = vectors.array[rows[good]]
    return torch.from_numpy(features), good, vectors.meta


def keep_usable(
    data: LabelledImages,
    encoders: dict[str, Any],
    good: np.ndarray,
    labels: Path,
    unmatched: str,
    skip_missing: bool,
    reporter: Reporter,
) -> tuple[LabelledImages, dict[str, Any]]:
    """The rows every encoder could embed; the others stop the evaluation unless --skip-missing."""
    if good.all():
        return data, encoders
    bad = [(data.rows[i], data.paths[i]) for i in np.flatnonzero(~good)]
    if not skip_missing:
        shown = ", ".join(f"line {line}: {path}" for line, path in bad[:5])
        raise UserError(
            f"{labels}: {len(bad)} listed images {unmatched} ({shown}); pass --skip-missing to evaluate the rest"
        )
    reporter.warn(f"{len(bad)} listed images {unmatched}; evaluating the other {int(good.sum()):,}")
    keep = np.flatnonzero(good)
    return data.subset(keep.tolist()), {name: f[torch.from_numpy(keep)] for name, f in encoders.items()}


def _embed_all(
    data: LabelledImages,
    model: Path | None,
    arch: str | None,
    image_size: int | None,
    embeddings: Path | None,
    baseline: Path | None,
    torch_device: torch.device,
    batch_size: int,
    workers: int | None,
    reporter: Reporter,
    start_size: int | None = None,
) -> tuple[dict[str, torch.Tensor], np.ndarray, dict[str, Any] | None, str, dict[str, str | None]]:
    """Every compared encoder's features of the labelled images: the encoder's (or the vectors of
    --embeddings), --baseline's and the random-init network's. Returns (features by name, rows every
    encoder could embed, the encoder's metadata, what a failed row means, where each came from)."""
    encoders: dict[str, torch.Tensor] = {}
    good = np.ones(len(data.paths), dtype=bool)
    if embeddings is not None:
        features, ok, meta = load_embeddings(embeddings, data)
        encoders["embeddings"] = features
        good &= ok
        metadata = embeddings_model(meta)
        unmatched, source = "is not in the embeddings", None
    else:
        choice = choose_model(model, arch, image_size)
        encoder = choice.load(torch_device)
        metadata = choice.metadata
    # Every network is loaded, and every flag checked against it, before any slow work.
    other = None if baseline is None else load_baseline(baseline, metadata, torch_device)
    if start_size is not None and metadata is None:
        raise UserError(f"--start-size {start_size}: the embeddings' encoder is unknown, so is its start")
    starts = start_networks(metadata, start_size, torch_device, reporter) if metadata else {}
    compared = {
        "baseline": other,
        **starts,
        RANDOM_INIT: random_init_network(metadata, torch_device) if metadata else None,
    }
    networks = {name: network for name, network in compared.items() if network is not None}
    if embeddings is None:
        reporter.info(
            f"evaluating {choice.description} on {len(data.paths):,} labelled images, {len(data.classes)} classes"
        )
        networks = {"encoder": encoder, **networks}
        unmatched, source = "could not be decoded", str(choice.path or choice.description)
    with reporter.progress(f"embedding ({', '.join(networks)})", unit="images") as progress:
        embedded, ok = embed_many(data.paths, networks, torch_device, batch_size, workers, progress)
    encoders |= embedded
    good &= ok

    sources = {
        "embeddings": str(embeddings),
        "encoder": source,
        "baseline": None if other is None else f"{baseline} ({metadata_of(other)['image_size']} px)",
        **{
            name: f"{metadata_of(network)['init']} ({metadata_of(network)['image_size']} px)"
            for name, network in starts.items()
        },
        RANDOM_INIT: f"{metadata['architecture']}, seed 0" if metadata else None,
    }
    return encoders, good, metadata, unmatched, sources


def start_networks(
    metadata: dict[str, Any], start_size: int | None, device: torch.device, reporter: Reporter
) -> dict[str, torch.nn.Module]:
    """The encoder's start, frozen, at the encoder's size and at the size its weights were trained at
    (`start_size`, else what the encoder records), where that differs: a start can score higher at its
    own size than at the encoder's, and that is what the user could have had without training."""
    if metadata.get("init", RANDOM) == RANDOM:
        if start_size is not None:
            raise UserError(f"--start-size {start_size}: the encoder started from random weights, so there is no start")
        return {}
    own = start_size or trained_size(metadata) or metadata["image_size"]
    networks = {}
    for size in dict.fromkeys((metadata["image_size"], own)):
        network, missing = start_network(metadata, device, size)
        if network is None:
            reporter.warn(f"no column for the encoder's start: {missing}")
            return {}
        networks[start_column(size, metadata["image_size"])] = network
    return networks


def evaluate_command(
    labels: Path,
    *,
    reporter: Reporter,
    model: Path | None = None,
    root: Path | None = None,
    device: str | None = None,
    json_out: Path | None = None,
    embeddings: Path | None = None,
    baseline: Path | None = None,
    skip_missing: bool = False,
    batch_size: int = 256,
    workers: int | None = None,
    report_dir: Path | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    start_size: int | None = None,
) -> dict[str, Any]:
    data = read_labels(labels, root)
    if warning := repeated_warning(data, labels):
        reporter.warn(warning)
    data = drop_missing(data, labels, skip_missing)
    classes = data.classes
    torch_device = pick_device(device)

    encoders, good, metadata, unmatched, sources = _embed_all(
        data, model, arch, image_size, embeddings, baseline, torch_device, batch_size, workers, reporter, start_size
    )
    data, encoders = keep_usable(data, encoders, good, labels, unmatched, skip_missing, reporter)
    classes = data.classes

    index = {label: i for i, label in enumerate(classes)}
    y = torch.tensor([index[label] for label in data.labels], device=torch_device)
    protocol = make_protocol(data, y, labels)
    results = {name: score(f.to(torch_device), y, len(classes), protocol) for name, f in encoders.items()}
    report = {
        "labels": str(labels),
        "protocol": protocol.name,
        "images": len(data.paths),
        "classes": classes,
        "sources": {name: sources[name] for name in encoders},
        "results": results,
    }
    starts = [name for name in results if is_start_column(name)]
    if starts and metadata:
        best = best_start(results, starts)
        sizes = {name: start_column_size(name, metadata["image_size"]) for name in starts}
        report["starts"], report["best_start"] = sizes, best
        if _worse_than_start(results[next(iter(results))], results[best]):
            report["use_start"] = start_command(metadata, sizes[best])
    from byolcli.evaluation.terminal import evaluation_report

    evaluation_report(report)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(report, indent=2))
    if report_dir is not None:
        _write_page(report_dir, labels, data, encoders, protocol, results, reporter)
    return report


def best_start(results: dict[str, Any], starts: list[str]) -> str:
    """The start column with the higher mean of kNN and linear top-1: the reference training must beat."""
    return max(starts, key=lambda name: results[name]["knn"]["top1"] + results[name]["linear"]["top1"])


def _worse_than_start(encoder: dict[str, Any], start: dict[str, Any]) -> bool:
    """Whether the encoder scores below its start on both kNN and the linear probe."""
    return all(encoder[method]["top1"] < start[method]["top1"] for method in ("knn", "linear"))


def _write_page(
    report_dir: Path,
    labels: Path,
    data: LabelledImages,
    encoders: dict[str, Any],
    protocol: Protocol,
    results: dict[str, Any],
    reporter: Reporter,
) -> None:
    from byolcli.core.gallery import write_gallery

    name = next(iter(encoders))
    train, test, _ = protocol.folds[0]
    page = write_gallery(
        report_dir,
        f"{name} on {labels.name}",
        data.paths,
        data.labels,
        encoders[name],
        train,
        test,
        data.classes,
        results[name]["knn"]["confusion"],
    )
    reporter.info(f"neighbours and confusion matrix: {page}")


def evaluate_folder_command(
    folder: Path,
    *,
    reporter: Reporter,
    model: str | Path | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    device: str | None = None,
    json_out: Path | None = None,
    report_dir: Path | None = None,
) -> dict[str, Any]:
    """`byol evaluate FOLDER`: the label-free measures and gallery for any folder and encoder."""
    from byolcli.core.files import check_outside_input
    from byolcli.core.scan import scan
    from byolcli.evaluation.judge import judge
    from byolcli.evaluation.terminal import judgement_report

    choice = choose_model(model, arch, image_size)
    for out in (json_out, report_dir):
        if out is not None:
            check_outside_input(out, folder)
    torch_device = pick_device(device)
    with reporter.progress("checking images") as progress:
        manifest = scan(folder, progress=progress, warn=reporter.warn)
    reporter.info(f"judging {choice.description} without labels on {len(manifest.images):,} images")
    judgement = judge(manifest.absolute_paths(), choice.load(torch_device), torch_device, reporter.progress)
    result = {
        "folder": str(manifest.root),
        "encoder": str(choice.path or choice.description),
        **judgement.to_dict(manifest.root),
    }
    judgement_report(result)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(result, indent=2))
    if report_dir is not None:
        from byolcli.evaluation.html_report import write_report

        page = write_report(report_dir / "index.html", f"{choice.description} on {manifest.root.name}", judgement)
        reporter.info(f"report: {page}")
    return result
