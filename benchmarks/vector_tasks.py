"""What `byol duplicates`, `groups` and `select` achieve on real photos, and what they cost at scale.

    python benchmarks/vector_tasks.py duplicates --model ENC [--model ENC ...]
    python benchmarks/vector_tasks.py pixels                  # how far an edit may go
    python benchmarks/vector_tasks.py groups --set cifar10-5k --model ENC ...
    python benchmarks/vector_tasks.py select --set clothing10 --model ENC
    python benchmarks/vector_tasks.py scale --rows 100000     # and --rows 1000000

A --model is what `byol embed --model` takes; `random:SIZE` is an untrained ResNet-18 at SIZE px, and
`PATH@SIZE` a plain ResNet-18 state dict at SIZE px. Results are printed as JSON lines and appended
to benchmarks/vector_tasks.jsonl; a model is recorded by its file name.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import SHARED_DATA, host_cpu
from PIL import Image, ImageEnhance, ImageOps

from byolcli.core.embed import embed_folder
from byolcli.vectors.clustering import choose_k, kmeans
from byolcli.vectors.duplicates import THRESHOLD, find_duplicates
from byolcli.vectors.pixel_check import SAME_PICTURE, Thumbprints
from byolcli.vectors.search import pairs_above, top_k
from byolcli.vectors.selection import select
from byolcli.vectors.store import Vectors, unit

CENTRE = "--raw" not in sys.argv
RESULTS = Path(__file__).with_name("vector_tasks.jsonl")
COPIES = {
    "jpeg60": lambda im: (im, 60),
    "half": lambda im: (im.resize((im.width // 2, im.height // 2), Image.BICUBIC), 95),
    "crop5": lambda im: (
        im.crop((round(im.width * 0.025), round(im.height * 0.025), round(im.width * 0.975), round(im.height * 0.975))),
        95,
    ),
    "flip": lambda im: (ImageOps.mirror(im), 95),
    "colour": lambda im: (ImageEnhance.Brightness(ImageEnhance.Color(im).enhance(1.6)).enhance(1.1), 95),
}


def record(result: dict) -> None:
    result = {"centred": CENTRE, "host": host_cpu(), "date": time.strftime("%Y-%m-%d"), **result}
    print(json.dumps(result), flush=True)
    with RESULTS.open("a") as file:
        file.write(json.dumps(result) + "\n")


def embedded(folder: Path, model: str) -> Vectors:
    if model.startswith("random:"):
        import torch

        from byolcli.core.backbones import make_backbone
        from byolcli.core.encoder import save_encoder
        from byolcli.core.pixels import MEAN, STD

        size = int(model.split(":")[1])
        path = Path(tempfile.mkdtemp()) / "random.safetensors"
        torch.manual_seed(0)
        save_encoder(
            make_backbone("resnet18"),
            path,
            architecture="resnet18",
            image_size=size,
            mean=MEAN,
            std=STD,
            train_images=0,
            epochs=0,
            steps=0,
            source="random init",
        )
        result = embed_folder(folder, path, workers=2)
    elif "@" in model:
        path, size = model.rsplit("@", 1)
        result = embed_folder(folder, path, arch="resnet18", image_size=int(size), workers=2)
    else:
        result = embed_folder(folder, model, workers=2)
    vectors = Vectors(result.vectors, result.paths, result.root, {})
    return vectors.centred() if CENTRE else vectors


def duplicates(args: argparse.Namespace) -> None:
    """Plant five kinds of copies of 200 clothing10 images among all of it; precision and recall of
    the near-duplicate pairs at each threshold."""
    source = SHARED_DATA / "clothing10"
    scratch = Path(tempfile.mkdtemp(prefix="planted-"))
    originals = sorted(p for p in source.rglob("*.jpg"))
    for path in originals:
        target = scratch / "orig" / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    rng = np.random.default_rng(0)
    planted = [originals[i] for i in sorted(rng.choice(len(originals), 200, replace=False))]
    for number, path in enumerate(planted):
        image = Image.open(path).convert("RGB")
        for kind, make in COPIES.items():
            copy, quality = make(image)
            target = scratch / "copies" / kind / f"{number:03d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            copy.save(target, quality=quality)
    for model in args.model:
        vectors = embedded(scratch, model)
        row = {name: i for i, name in enumerate(vectors.paths)}
        truth = {}  # (i, j) -> kind, for original–copy pairs
        for number, path in enumerate(planted):
            original = row["orig/" + str(path.relative_to(source))]
            for kind in COPIES:
                copy = row[f"copies/{kind}/{number:03d}.jpg"]
                truth[min(original, copy), max(original, copy)] = kind
        groups_of = np.full(len(vectors), -1)
        for number, path in enumerate(planted):
            members = [row["orig/" + str(path.relative_to(source))]] + [
                row[f"copies/{kind}/{number:03d}.jpg"] for kind in COPIES
            ]
            groups_of[members] = number
        found = [part for part in pairs_above(vectors, args.lowest)]
        i = np.concatenate([p[0] for p in found])
        j = np.concatenate([p[1] for p in found])
        s = np.concatenate([p[2] for p in found])
        same_plant = (groups_of[i] >= 0) & (groups_of[i] == groups_of[j])
        kinds = np.array([truth.get((a, b), "") for a, b in zip(i.tolist(), j.tolist())])
        prints = Thumbprints()
        pixels = prints.agreement([vectors.file(r) for r in i.tolist()], [vectors.file(r) for r in j.tolist()])
        sweep = {}
        for threshold in np.round(np.arange(args.lowest, 0.999, 0.05), 3):
            for pixel in (None, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9):
                above = (s >= threshold) & (pixels >= (pixel if pixel is not None else -2))
                recall = {kind: int((above & (kinds == kind)).sum()) / len(planted) for kind in COPIES}
                involved = above & ((groups_of[i] >= 0) | (groups_of[j] >= 0))
                sweep[f"{threshold:.3f}" + (f"/{pixel:.2f}" if pixel is not None else "")] = {
                    "recall": recall,
                    "precision_all_pairs": float(same_plant[above].mean()) if above.any() else 1.0,
                    "precision_pairs_with_a_copy": float(same_plant[involved].mean()) if involved.any() else 1.0,
                    "pairs": int(above.sum()),
                }
        record({"task": "duplicates", "model": Path(model).name, "images": len(vectors), "sweep": sweep})
        # Whole groups as `byol duplicates` finds them at its defaults: a planted copy is found when it
        # shares a group with its original; a group is pure when it holds one original and its copies.
        start = time.perf_counter()
        found_groups = find_duplicates(vectors)
        seconds = time.perf_counter() - start
        group_of = np.full(len(vectors), -1)
        for number, group in enumerate(found_groups):
            group_of[group.rows] = number
        found = {kind: 0 for kind in COPIES}
        for (a, b), kind in truth.items():
            found[kind] += bool(group_of[a] >= 0 and group_of[a] == group_of[b])
        pure = sum(
            bool(len({groups_of[r] for r in group.rows}) == 1 and groups_of[group.rows[0]] >= 0)
            for group in found_groups
        )
        record(
            {
                "task": "duplicates-groups",
                "model": Path(model).name,
                "threshold": THRESHOLD,
                "same_picture": SAME_PICTURE,
                "seconds": round(seconds, 1),
                "groups": len(found_groups),
                "groups_of_one_planted_image": pure,
                "recall": {kind: count / len(planted) for kind, count in found.items()},
            }
        )
    if args.keep:
        print("kept", scratch)
    else:
        shutil.rmtree(scratch)


# Edits beyond the planted five, to see where the pixel check stops calling a copy a copy.
def _cut(im: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    return im.crop(
        (round(im.width * left), round(im.height * top), round(im.width * (1 - right)), round(im.height * (1 - bottom)))
    )


EDITS = {
    **{kind: lambda im, make=make: make(im)[0] for kind, make in COPIES.items()},
    "jpeg20": lambda im: im,
    "quarter": lambda im: im.resize((im.width // 4, im.height // 4), Image.BICUBIC),
    "crop2": lambda im: _cut(im, 0.01, 0.01, 0.01, 0.01),
    "crop10": lambda im: _cut(im, 0.05, 0.05, 0.05, 0.05),
    "crop5-one-corner": lambda im: _cut(im, 0.05, 0.05, 0, 0),
    "grey": lambda im: im.convert("L").convert("RGB"),
    "contrast": lambda im: ImageEnhance.Contrast(im).enhance(1.4),
    "blur": lambda im: im.resize((im.width // 3, im.height // 3), Image.BICUBIC).resize(im.size, Image.BICUBIC),
    "rotate2": lambda im: im.rotate(2, resample=Image.BICUBIC),
}


def pixels(args: argparse.Namespace) -> None:
    """The pixel check's score between 200 clothing10 photos and edited copies of them, per edit."""
    originals = sorted((SHARED_DATA / "clothing10").rglob("*.jpg"))
    rng = np.random.default_rng(0)
    planted = [originals[i] for i in sorted(rng.choice(len(originals), 200, replace=False))]
    scratch = Path(tempfile.mkdtemp(prefix="edits-"))
    prints = Thumbprints()
    for kind, edit in EDITS.items():
        copies = []
        for number, path in enumerate(planted):
            copies.append(scratch / f"{kind}-{number:03d}.jpg")
            quality = {"jpeg60": 60, "jpeg20": 20}.get(kind, 95)
            edit(Image.open(path).convert("RGB")).save(copies[-1], quality=quality)
        score = prints.agreement(planted, copies)
        record(
            {
                "task": "pixels",
                "edit": kind,
                "same_picture": SAME_PICTURE,
                "found": float((score >= SAME_PICTURE).mean()),
                "lowest": round(float(score.min()), 3),
                "5th_percentile": round(float(np.percentile(score, 5)), 3),
                "median": round(float(np.median(score)), 3),
            }
        )
    shutil.rmtree(scratch)


def ami(labels: np.ndarray, groups: np.ndarray) -> float:
    """Adjusted mutual information (Vinh et al. 2010), arithmetic-mean normalised as scikit-learn's."""
    from math import exp, lgamma, log

    n = len(labels)
    _, a_index = np.unique(labels, return_inverse=True)
    _, b_index = np.unique(groups, return_inverse=True)
    table = np.zeros((a_index.max() + 1, b_index.max() + 1))
    np.add.at(table, (a_index, b_index), 1)
    a, b = table.sum(1), table.sum(0)
    nonzero = table > 0
    mi = float((table[nonzero] / n * np.log(n * table[nonzero] / np.outer(a, b)[nonzero])).sum())
    entropy = lambda counts: float(-(counts / n * np.log(counts / n)).sum())  # noqa: E731
    expected = 0.0
    for ai in a:
        for bj in b:
            for nij in range(int(max(1, ai + bj - n)), int(min(ai, bj)) + 1):
                log_p = (
                    lgamma(ai + 1)
                    + lgamma(bj + 1)
                    + lgamma(n - ai + 1)
                    + lgamma(n - bj + 1)
                    - lgamma(n + 1)
                    - lgamma(nij + 1)
                    - lgamma(ai - nij + 1)
                    - lgamma(bj - nij + 1)
                    - lgamma(n - ai - bj + nij + 1)
                )
                expected += nij / n * log(n * nij / (ai * bj)) * exp(log_p)
    mean_entropy = (entropy(a) + entropy(b)) / 2
    return (mi - expected) / max(mean_entropy - expected, 1e-12)


def purity(labels: np.ndarray, groups: np.ndarray) -> float:
    return sum(np.bincount(labels[groups == g]).max() for g in np.unique(groups)) / len(labels)


def labelled(set_name: str, split: str) -> tuple[Path, dict[str, str]]:
    folder = SHARED_DATA / set_name / split
    rows = [line.split(",") for line in (SHARED_DATA / set_name / "labels.csv").read_text().splitlines()[1:]]
    return folder, {path.split("/", 1)[1]: label for path, label, sp in rows if path.startswith(split + "/")}


def silhouette(rows: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Mean silhouette (Rousseeuw 1987) of unit rows grouped by `labels`, by cosine distance."""
    distance = np.clip(1 - rows @ rows.T, 0, None)
    members = np.eye(k, dtype=np.float32)[labels]
    sizes = members.sum(0)
    total = distance @ members
    within = total[np.arange(len(rows)), labels] / np.maximum(sizes[labels] - 1, 1)
    total[:, sizes == 0] = np.inf
    total[np.arange(len(rows)), labels] = np.inf
    between = (total / np.maximum(sizes, 1)).min(1)
    score = (between - within) / np.maximum(np.maximum(between, within), 1e-12)
    score[sizes[labels] == 1] = 0
    return float(score.mean())


def groups(args: argparse.Namespace) -> None:
    """AMI and purity of `byol groups` against the labels (used only to score): at the rule's k, at
    the number of classes, at the k of the highest silhouette, and over a grid."""
    folder, label_of = labelled(args.set, "test")
    for model in args.model:
        vectors = embedded(folder, model)
        names = sorted(set(label_of.values()))
        y = np.array([names.index(label_of[p]) for p in vectors.paths])
        rule = choose_k(len(vectors))
        rows = vectors.unit_rows()
        found = {}
        for k in sorted({2, 3, 5, 8, len(names), 15, 20, 30, 50, rule}):
            clusters = kmeans(vectors, k)
            found[k] = {
                "ami": round(ami(y, clusters.labels), 4),
                "purity": round(purity(y, clusters.labels), 4),
                "silhouette": round(silhouette(rows, clusters.labels, k), 4),
            }
        best_silhouette = max(found, key=lambda k: found[k]["silhouette"])
        record(
            {
                "task": "groups",
                "set": args.set,
                "model": Path(model).name,
                "images": len(vectors),
                "rule_k": rule,
                "silhouette_k": best_silhouette,
                "classes": len(names),
                "by_k": found,
            }
        )


def select_task(args: argparse.Namespace) -> None:
    """A linear probe trained on n selected images against n random ones, scored on the test split."""
    import torch

    from byolcli.evaluation.metrics import linear_probe_scores

    train_folder, train_labels = labelled(args.set, "train")
    test_folder, test_labels = labelled(args.set, "test")
    for model in args.model:
        train, test = embedded(train_folder, model), embedded(test_folder, model)
        names = sorted(set(train_labels.values()))
        y_train = torch.tensor([names.index(train_labels[p]) for p in train.paths])
        y_test = torch.tensor([names.index(test_labels[p]) for p in test.paths])
        x_test = torch.from_numpy(test.array)
        for n in args.n:
            for seed in range(args.seeds):
                rng = np.random.default_rng(seed)
                picks = {"random": rng.choice(len(train), n, replace=False).tolist()}
                for strategy in ("typical", "spread"):
                    picks[strategy] = select(train, n, np.zeros(0, dtype=np.int64), strategy, seed)
                for strategy, rows in picks.items():
                    x = torch.from_numpy(np.ascontiguousarray(train.array[rows]))
                    y = y_train[rows]
                    scores, _, _ = linear_probe_scores(x, y, x_test, len(names))
                    accuracy = float((scores.argmax(1) == y_test).float().mean())
                    classes_seen = len(set(y.tolist()))
                    record(
                        {
                            "task": "select",
                            "set": args.set,
                            "model": Path(model).name,
                            "n": n,
                            "seed": seed,
                            "strategy": strategy,
                            "accuracy": round(accuracy, 4),
                            "classes_seen": classes_seen,
                        }
                    )


class MemoryWatch:
    """The highest resident memory of this process while it runs, split as Linux splits it: anonymous
    (what the program allocated) and file-backed (pages of the memory-mapped vectors, which the
    kernel can drop at will)."""

    def __init__(self) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while self.running:
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) // 1024)
            time.sleep(0.05)

    def __enter__(self) -> MemoryWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()


def scale(args: argparse.Namespace) -> None:
    """Time and peak memory of similar, duplicates and groups on generated vectors (clusters of
    points on the sphere with planted near-copies) in a memory-mapped .npy as `byol embed` writes,
    each in a process of its own."""
    folder = Path(tempfile.mkdtemp(prefix="scale-"))
    path = folder / "vecs.npy"
    rng = np.random.default_rng(0)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.rows, args.dim))
    centres = unit(rng.standard_normal((1000, args.dim)).astype(np.float32))
    for start in range(0, args.rows, 65536):
        stop = min(start + 65536, args.rows)
        noise = rng.standard_normal((stop - start, args.dim)).astype(np.float32) * 0.06
        array[start:stop] = centres[rng.integers(0, 1000, stop - start)] + noise
    copies = rng.choice(args.rows, args.rows // 100, replace=False)  # 1% of rows get a near-copy elsewhere
    targets = rng.permutation(np.setdiff1d(np.arange(args.rows), copies))[: len(copies)]
    array[np.sort(targets)] = array[copies[np.argsort(targets)]] + 0.01 * rng.standard_normal((len(copies), args.dim))
    array.flush()
    del array
    (folder / "vecs.paths.txt").write_text("".join(f"{i}.jpg\n" for i in range(args.rows)))
    for task in ("similar", "groups", "duplicates"):
        subprocess.run([sys.executable, __file__, "scale-one", str(path), task, str(len(copies))], check=True)
    shutil.rmtree(folder)


def scale_one(args: argparse.Namespace) -> None:
    from byolcli.vectors.store import open_vectors

    before = next(
        int(line.split()[1]) // 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("RssAnon")
    )
    with MemoryWatch() as memory:
        start = time.perf_counter()
        vectors = open_vectors(Path(args.path)).centred()
        if args.task == "similar":
            top_k(vectors, vectors.unit_rows(0, 10), 10, exclude=np.arange(10))
            found = {}
        elif args.task == "groups":
            k = choose_k(len(vectors))
            kmeans(vectors, k)
            found = {"k": k}
        else:
            groups = find_duplicates(vectors)
            found = {"groups": len(groups), "planted_copies": args.planted}
        seconds = time.perf_counter() - start
    rows, dim = vectors.array.shape
    record(
        {
            "task": f"scale-{args.task}",
            "rows": rows,
            "vectors_mib": round(rows * dim * 4 / 2**20),
            "seconds": round(seconds, 1),
            "anonymous_before_mib": before,
            "peak_anonymous_mib": memory.peak["RssAnon"],
            "peak_file_backed_mib": memory.peak["RssFile"],
            **found,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("duplicates")
    d.add_argument("--model", action="append", required=True)
    d.add_argument("--lowest", type=float, default=0.8)
    d.add_argument("--keep", action="store_true")
    g = sub.add_parser("groups")
    g.add_argument("--set", required=True)
    g.add_argument("--model", action="append", required=True)
    s = sub.add_parser("select")
    s.add_argument("--set", required=True)
    s.add_argument("--model", action="append", required=True)
    s.add_argument("--n", type=int, action="append", default=None)
    s.add_argument("--seeds", type=int, default=5)
    c = sub.add_parser("scale")
    c.add_argument("--rows", type=int, required=True)
    c.add_argument("--dim", type=int, default=512)
    sub.add_parser("pixels")
    one = sub.add_parser("scale-one")
    one.add_argument("path")
    one.add_argument("task", choices=("similar", "groups", "duplicates"))
    one.add_argument("planted", type=int)
    args, _ = parser.parse_known_args()
    if args.what == "select" and args.n is None:
        args.n = [100, 500]
    tasks = {
        "duplicates": duplicates,
        "pixels": pixels,
        "groups": groups,
        "select": select_task,
        "scale": scale,
        "scale-one": scale_one,
    }
    tasks[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
