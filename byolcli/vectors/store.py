"""The vectors that `byol similar`, `duplicates`, `groups` and `select` work on: a `byol embed`
output read as it is, or a folder embedded into byolcli's cache (reusing every row whose image has
not changed since the last time), both as one read-only memory map with its row order.

Cosine similarity is what all four commands compare by, so rows are made unit length a block at a
time as they are read: memory stays at the vectors' memory map plus one block.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from byolcli.core.errors import UserError
from byolcli.core.files import cache_dir
from byolcli.core.names import read_names

if TYPE_CHECKING:
    from byolcli.core.model_choice import ModelChoice
    from byolcli.core.terminal import Reporter

# Rows per block: a block of rows against a block of rows is a BLOCK × BLOCK float32 matrix.
BLOCK = 4096


@dataclass
class Vectors:
    array: np.ndarray  # rows × dim, read-only (a memory map)
    paths: list[str]  # row i's image, relative to `root`
    root: Path | None  # the embedded folder, where it is known
    meta: dict[str, Any]  # the `byol embed` meta.json, where there is one
    centre: np.ndarray | None = None  # subtracted from every row before it is made unit length

    def centred(self) -> Vectors:
        """The same rows, compared after subtracting their mean."""
        total = np.zeros(self.array.shape[1], dtype=np.float64)
        for start in range(0, len(self), BLOCK):
            total += self.array[start : start + BLOCK].sum(0, dtype=np.float64)
        return Vectors(self.array, self.paths, self.root, self.meta, (total / max(len(self), 1)).astype(np.float32))

    def __len__(self) -> int:
        return len(self.paths)

    def unit_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop as float32 of unit length (an all-zero row stays zero)."""
        return self.unit(self.array[start:stop])

    def unit(self, rows: np.ndarray) -> np.ndarray:
        """`rows` of this array (or embedded alike) as compared: centred, if so, and of unit length."""
        return unit(np.asarray(rows, dtype=np.float32) - self.centre if self.centre is not None else rows)

    def blocks(self, size: int = BLOCK) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, unit rows) for consecutive blocks of `size` rows."""
        for start in range(0, len(self), size):
            yield start, self.unit_rows(start, start + size)

    def file(self, row: int) -> Path:
        return (self.root / self.paths[row]) if self.root is not None else Path(self.paths[row])


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    scaled: np.ndarray = rows / np.maximum(norms, 1e-12)
    return scaled


def open_vectors(npy: Path) -> Vectors:
    """A `byol embed` output: the .npy with its .paths.txt (and .meta.json, where there is one)."""
    from byolcli.core.embed import sidecars

    files = sidecars(npy)
    if not npy.is_file():
        raise UserError(f"{npy}: not found")
    if not files["paths"].is_file():
        raise UserError(f"{files['paths']}: not found (the row order `byol embed` writes beside {npy.name})")
    try:
        array = np.load(npy, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise UserError(f"{npy}: not a NumPy array ({exc})") from None
    if array.ndim != 2 or array.dtype.kind != "f":
        raise UserError(f"{npy}: holds a {array.dtype} array of shape {array.shape}, not rows of float vectors")
    try:
        paths = read_names(files["paths"].read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{files['paths']}: not a list of paths ({exc})") from None
    meta: dict[str, Any] = {}
    if files["meta"].is_file():
        try:
            meta = json.loads(files["meta"].read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UserError(f"{files['meta']}: not JSON ({exc})") from None
    if meta.get("rows") == len(paths) < len(array):  # rows of an append that stopped before it was published
        array = array[: len(paths)]
    if len(paths) != len(array):
        raise UserError(f"{npy} has {len(array):,} rows but {files['paths']} lists {len(paths):,} paths")
    root = Path(meta["folder"]) if isinstance(meta.get("folder"), str) else None
    return Vectors(array, paths, root, meta)


def model_of(meta: dict[str, Any]) -> ModelChoice | None:
    """The encoder that made a `byol embed` output, where it can still be had as it was."""
    from byolcli.core.inputs import IMAGENET
    from byolcli.core.model_choice import choose_model

    source = meta.get("encoder")
    if not isinstance(source, str):
        return None
    if source.startswith(f"{IMAGENET}:"):
        source = IMAGENET
    elif not Path(source).is_file():
        return None
    choice = choose_model(source, meta.get("architecture"), meta.get("image_size"))
    return choice if choice.fingerprint == meta.get("model", choice.fingerprint) else None


def cached_embedding(folder: Path, fingerprint: str) -> Path:
    """Where a folder's vectors by one encoder are kept between commands."""
    key = hashlib.sha256(f"{folder.resolve()}\0{fingerprint}".encode()).hexdigest()[:20]
    return cache_dir() / "vectors" / f"{key}.npy"


def load_vectors(
    source: Path,
    *,
    reporter: Reporter,
    model: Path | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    device: str | None = None,
) -> Vectors:
    """SOURCE as vectors: a .npy file as it is, or a folder embedded by `--model` (as `byol embed`
    would, into the cache)."""
    if source.suffix == ".npy" and not source.is_dir():
        if model is not None or arch is not None or image_size is not None:
            raise UserError(
                f"{source}: vectors are already embedded; --model, --arch and --image-size go with a folder"
            )
        return open_vectors(source)
    from byolcli.core.embed import EmbedSettings, embed_with
    from byolcli.core.inference import pick_device
    from byolcli.core.inputs import require_folder
    from byolcli.core.model_choice import choose_model

    require_folder(source)
    choice = choose_model(model, arch, image_size)
    torch_device = pick_device(device)
    encoder = choice.load(torch_device)  # reads the file once, which also gives its fingerprint
    out = cached_embedding(source, choice.fingerprint)
    embed_with(source, out, choice, encoder, torch_device, EmbedSettings(), reporter, cache=True)
    return open_vectors(out)
