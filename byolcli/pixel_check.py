"""Whether two images have the same picture in them, by their pixels: the second look that
`byol duplicates` gives the pairs their vectors put close.

An encoder's vector says what an image shows, so two different red jackets can be as close as a
jacket and its re-encoded copy. Copies keep the picture's layout of light and dark; different photos
do not. The check compares small grey thumbnails by correlation (brightness and contrast changes do not
matter), each pair both ways round (a mirrored copy is still a copy), of the whole image and of its
centre (a copy cut a little smaller is the original's centre).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 32  # thumbnail side in pixels: fine enough to tell photos apart, coarse enough to forgive re-encoding
CENTRE = 0.95  # the share of each side the centre thumbnail keeps
# Correlation from which two thumbnails are the same picture (measured: benchmarks/README.md).
SAME_PICTURE = 0.96
PAIRS_AT_ONCE = 8192  # pairs compared in one go: memory stays at a few tens of MB


def thumbprint(path: Path) -> np.ndarray | None:
    """Grey SIDE × SIDE thumbnails of the whole image and of its centre, each of zero mean and unit
    length (2 × SIDE × SIDE, float16); None if the image will not open."""
    try:
        with Image.open(path) as image:
            image.draft("L", (SIDE * 4, SIDE * 4))  # JPEGs decode at a fraction of their size
            grey = image.convert("L")
    except Exception:  # noqa: BLE001 - whatever Pillow raises, there is nothing to compare
        return None
    width, height = grey.size
    margin_x, margin_y = width * (1 - CENTRE) / 2, height * (1 - CENTRE) / 2
    centre = grey.crop((margin_x, margin_y, width - margin_x, height - margin_y))
    views = np.stack(
        [np.asarray(view.resize((SIDE, SIDE), Image.Resampling.BOX), dtype=np.float32) for view in (grey, centre)]
    )
    views -= views.mean(axis=(1, 2), keepdims=True)
    views /= np.maximum(np.linalg.norm(views, axis=(1, 2), keepdims=True), 1e-6)
    return views.astype(np.float16)


def agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlations of pairs of thumbprints (n × 2 × SIDE × SIDE each): per pair, the best of whole
    against whole and whole against centre either way, each with b as it is and mirrored."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    mirrored = b[..., ::-1]
    views = ((0, 0), (0, 1), (1, 0))
    scores = [np.einsum("nij,nij->n", a[:, x], other[:, y]) for x, y in views for other in (b, mirrored)]
    best: np.ndarray = np.max(scores, axis=0)
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
        """agreement() of each pair of files, PAIRS_AT_ONCE pairs at a time; NaN where either cannot be read."""
        unreadable = np.full((2, SIDE, SIDE), np.nan, dtype=np.float16)

        def stacked(paths: list[Path]) -> np.ndarray:
            return np.stack([made if (made := self(path)) is not None else unreadable for path in paths])

        scores = [
            agreement(stacked(first[start : start + PAIRS_AT_ONCE]), stacked(second[start : start + PAIRS_AT_ONCE]))
            for start in range(0, len(first), PAIRS_AT_ONCE)
        ]
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    def same_picture(self, a: Path, b: Path, threshold: float = SAME_PICTURE) -> bool | None:
        """Whether a and b hold the same picture; None when either cannot be read."""
        score = float(self.agreement([a], [b])[0])
        return None if np.isnan(score) else score >= threshold
