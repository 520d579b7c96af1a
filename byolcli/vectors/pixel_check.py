"""Whether two images have the same picture in them, by their pixels: the second look that
`byol duplicates` gives the pairs their vectors put close.

An encoder's vector says what an image shows, so two different red jackets can be as close as a
jacket and its re-encoded copy. Even their pixels are close at a glance: photos of one kind of thing,
shot the same way, share their layout of light and dark (a white shirt on a red bed). What a copy
keeps and another photo does not is the detail: the print on the shirt, the folds, the texture. The
check compares that detail, a grey thumbnail less its blurred self, by correlation (brightness and
contrast changes do not matter), each pair both ways round (a mirrored copy is still a copy), of the
whole image and of its centre (a copy cut a little smaller is the original's centre).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 64  # thumbnail side in pixels: fine enough to hold a photo's detail, coarse enough to forgive re-encoding
COARSE = 16  # side of the blurred thumbnail taken away: what is left is the detail finer than this
CENTRE = 0.95  # the share of each side the centre thumbnail keeps
# Correlation from which two thumbnails are the same picture (measured: benchmarks/README.md).
SAME_PICTURE = 0.75
PAIRS_AT_ONCE = 1024  # pairs compared in one go: memory stays at a few tens of MB


def thumbprint(path: Path) -> np.ndarray | None:
    """The detail of grey SIDE × SIDE thumbnails of the whole image and of its centre, each of zero
    mean and unit length (2 × SIDE × SIDE, float16); None if the image will not open."""
    try:
        with Image.open(path) as image:
            image.draft("L", (SIDE * 4, SIDE * 4))  # JPEGs decode at a fraction of their size
            grey = image.convert("L")
    except Exception:  # noqa: BLE001 - whatever Pillow raises, there is nothing to compare
        return None
    width, height = grey.size
    margin_x, margin_y = width * (1 - CENTRE) / 2, height * (1 - CENTRE) / 2
    centre = grey.crop((margin_x, margin_y, width - margin_x, height - margin_y))
    views = np.stack([_detail(view.resize((SIDE, SIDE), Image.Resampling.BOX)) for view in (grey, centre)])
    views -= views.mean(axis=(1, 2), keepdims=True)
    views /= np.maximum(np.linalg.norm(views, axis=(1, 2), keepdims=True), 1e-6)
    return views.astype(np.float16)


def _detail(thumbnail: Image.Image) -> np.ndarray:
    """The thumbnail less its COARSE × COARSE blur."""
    fine = np.asarray(thumbnail, dtype=np.float32)
    coarse = Image.fromarray(fine).resize((COARSE, COARSE), Image.Resampling.BOX)
    return fine - np.asarray(coarse.resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float32)


def agreement(a: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Correlations of thumbprint a (2 × SIDE × SIDE) with each of others (n × 2 × SIDE × SIDE): per
    pair, the best of whole against whole and whole against centre either way, with a as it is and
    mirrored (which compares others mirrored)."""
    views = np.concatenate([a, a[..., ::-1]]).reshape(4, -1).astype(np.float32)
    products = views @ others.reshape(len(others) * 2, -1).astype(np.float32).T
    scores = products.reshape(2, 2, len(others), 2)  # a mirrored or not, a's view, pair, other's view
    best: np.ndarray = np.maximum.reduce([scores[:, 0, :, 0], scores[:, 0, :, 1], scores[:, 1, :, 0]]).max(axis=0)
    return best


class Thumbprints:
    """Thumbprints of files, each made once, on first asking."""

    def __init__(self) -> None:
        self.made: dict[Path, np.ndarray | None] = {}

    def __call__(self, path: Path) -> np.ndarray | None:
        if path not in self.made:
            self.made[path] = thumbprint(path)
        return self.made[path]

    def agreement(self, first: list[Path], second: list[Path]) -> np.ndarray:
        """agreement() of each pair of files, NaN where either cannot be read. The pairs of one first
        file are compared in one matrix product, PAIRS_AT_ONCE at a time."""
        unreadable = np.full((2, SIDE, SIDE), np.nan, dtype=np.float16)
        scores = np.full(len(first), np.nan, dtype=np.float32)
        pairs_of: dict[Path, list[int]] = defaultdict(list)
        for pair, path in enumerate(first):
            pairs_of[path].append(pair)
        for path, pairs in pairs_of.items():
            if (made := self(path)) is None:
                continue
            for start in range(0, len(pairs), PAIRS_AT_ONCE):
                chunk = pairs[start : start + PAIRS_AT_ONCE]
                others = [other if (other := self(second[pair])) is not None else unreadable for pair in chunk]
                scores[chunk] = agreement(made, np.stack(others))
        return scores

    def same_picture(self, a: Path, b: Path, threshold: float = SAME_PICTURE) -> bool | None:
        """Whether a and b hold the same picture; None when either cannot be read."""
        score = float(self.agreement([a], [b])[0])
        return None if np.isnan(score) else score >= threshold
