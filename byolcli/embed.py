"""`byol embed`: one vector per image, rows in a fixed, documented order.

Output, for `--out vecs.npy`:
    vecs.npy          float32 (or float16) array, one row per image
    vecs.paths.txt    row i's image path, relative to the folder, UTF-8, one per line
                      (names with control characters escaped: names.py)
    vecs.skipped.txt  files that could not be used: "path<TAB>reason" per line
    vecs.meta.json    which encoder and settings made the rows, and each file's size and
                      mtime, so that a rerun embeds only new or changed images

The array is written through a memory map (memory stays flat at any folder size)
into a partial file that is renamed into place at the end, together with the
files beside it. An interrupted run (Ctrl-C, SIGTERM, a full disk) leaves the
partial file and its progress record; the same command continues it. One
process at a time writes an output (locks.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from byolcli.encoder import metadata_of
from byolcli.errors import Stopped, UserError
from byolcli.files import atomic_path, atomic_write_text, check_outside_input, write_failed
from byolcli.inference import autocast_dtype, iter_embeddings, pick_device
from byolcli.inputs import EMBEDDING_DTYPES, PRECISIONS, require_choice
from byolcli.locks import exclusive
from byolcli.model_choice import ModelChoice, choose_model
from byolcli.names import escape_name, read_names, write_names
from byolcli.scan import ImageEntry, Manifest, Skipped, scan
from byolcli.signals import StopRequests

if TYPE_CHECKING:
    import torch

    from byolcli.terminal import Reporter

DTYPES = {name: np.dtype(name) for name in EMBEDDING_DTYPES}
# How many rows between progress records of a partial run (and so the most work
# an interruption can lose).
SAVE_EVERY_ROWS = 4096


@dataclass
class Embeddings:
    vectors: np.ndarray
    paths: list[str]  # relative to `root`, in row order
    skipped: list[Skipped]
    root: Path


def embed_folder(
    folder: str | Path,
    model: str | Path | None = None,
    *,
    batch_size: int = 256,
    workers: int | None = None,
    device: str | None = None,
    normalize: bool = False,
    precision: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    arch: str | None = None,
    image_size: int | None = None,
) -> Embeddings:
    """Embed every usable image of `folder` in memory (the notebook API).

    `model`, `arch` and `image_size` are what `byol embed`'s flags of those names take.
    Returns an Embeddings with `vectors[i]` belonging to `paths[i]`.
    """
    choice = choose_model(model, arch, image_size)
    manifest = scan(folder)
    torch_device = pick_device(device)
    encoder = choice.load(torch_device)
    paths = [image.path for image in manifest.images]
    vectors = np.zeros((len(paths), metadata_of(encoder)["feature_dim"]), dtype=np.float32)
    good = np.ones(len(paths), dtype=bool)
    for start, batch, ok in iter_embeddings(
        manifest.absolute_paths(), encoder, torch_device, batch_size, workers, normalize, precision
    ):
        vectors[start : start + len(batch)] = batch
        good[start : start + len(batch)] = ok
        if progress:
            progress(start + len(batch), len(paths))
    broken = [Skipped(p, "undecodable at embedding time") for p, g in zip(paths, good) if not g]
    return Embeddings(vectors[good], [p for p, g in zip(paths, good) if g], manifest.skipped + broken, manifest.root)


# --- the command ---------------------------------------------------------------------


def sidecars(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("")
    return {
        "paths": stem.with_name(stem.name + ".paths.txt"),
        "skipped": stem.with_name(stem.name + ".skipped.txt"),
        "meta": stem.with_name(stem.name + ".meta.json"),
        "partial": out.with_name(f".{out.name}.partial.npy"),
        "progress": out.with_name(f".{out.name}.partial.json"),
        "lock": out.with_name(f".{out.name}.lock"),
    }


def embed_command(
    folder: Path,
    out: Path,
    *,
    reporter: Reporter,
    model: str | Path | None = None,
    normalize: bool = False,
    dtype: str = "float32",
    batch_size: int = 256,
    workers: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    arch: str | None = None,
    image_size: int | None = None,
) -> None:
    require_choice("--precision", precision, PRECISIONS)
    require_choice("--dtype", dtype, tuple(DTYPES))
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if out.suffix != ".npy":
        raise UserError(f"--out {out}: must end in .npy")
    choice = choose_model(model, arch, image_size)
    metadata = choice.metadata
    torch_device = pick_device(device)
    encoder = choice.load(torch_device)  # weights that do not fit are refused before any slow work
    with reporter.progress("checking images") as progress:
        manifest = scan(folder, progress=progress, warn=reporter.warn)
    check_outside_input(out, manifest.root)
    files = sidecars(out)
    with exclusive(files["lock"], out):
        reporter.info(
            f"using encoder {choice.description} trained on {metadata['train_images']:,} images from "
            f"{metadata.get('source') or '?'} at {metadata.get('created', '?')}"
            if choice.kind == "encoder"
            else f"using {choice.description}"
        )
        exactness = str(autocast_dtype(torch_device, precision) or "fp32").replace("torch.", "")
        settings = {
            "model": choice.fingerprint,
            "image_size": metadata["image_size"],
            "normalize": normalize,
            "dtype": dtype,
            "precision": exactness,
            "folder": str(manifest.root),
        }
        job = EmbedJob(manifest, out, files, choice, settings, metadata["feature_dim"])
        with StopRequests(
            lambda signum: reporter.warn(
                f"{signal.Signals(signum).name}: stopping after this batch to save what is embedded"
            )
        ) as stop:
            good = job.embed(encoder, torch_device, batch_size, workers, normalize, precision, reporter, stop)
        job.publish(good, reporter)


@dataclass
class EmbedJob:
    """One `byol embed` into `out`: the rows to compute, the partial array, the files beside it."""

    manifest: Manifest
    out: Path
    files: dict[str, Path]
    model: ModelChoice
    settings: dict[str, Any]
    dim: int

    def __post_init__(self) -> None:
        self.images = self.manifest.images
        self.keys = [[image.size, image.mtime_ns] for image in self.images]
        self.dtype = DTYPES[self.settings["dtype"]]

    def embed(
        self,
        encoder: torch.nn.Module,
        device: torch.device,
        batch_size: int,
        workers: int | None,
        normalize: bool,
        precision: str | None,
        reporter: Reporter,
        stop: StopRequests,
    ) -> np.ndarray:
        """Fill the partial array (reusing rows of an earlier output, continuing an interrupted run);
        returns which rows decoded. Raises Stopped, with the progress saved, if asked to stop."""
        files, images, rows = self.files, self.images, len(self.images)
        # Rows that an earlier output with the same encoder and settings already holds.
        reusable = _reusable_rows(self.out, files, self.settings)
        source_rows = np.array([reusable.get((image.path, image.size, image.mtime_ns), -1) for image in images])
        todo = np.flatnonzero(source_rows < 0)

        # A partial run of exactly this job continues where it stopped.
        record = {"settings": self.settings, "paths_sha256": _paths_digest(images, self.keys)}
        done, broken = _partial_progress(files, record)
        good = np.ones(rows, dtype=bool)
        good[broken] = False
        if done:
            array = np.load(files["partial"], mmap_mode="r+")
            reporter.info(f"continuing an interrupted embed: {done:,} of {len(todo):,} images already done")
        else:
            try:
                array = allocated_memmap(files["partial"], self.dtype, (rows, self.dim))
            except OSError as exc:
                raise write_failed(self.out, exc) from exc
            if reusable:
                old = np.load(self.out, mmap_mode="r")
                for row in np.flatnonzero(source_rows >= 0):
                    array[row] = old[source_rows[row]]
                reporter.info(f"{rows - len(todo):,} images unchanged since the last embed; embedding {len(todo):,}")

        absolute = self.manifest.absolute_paths()
        remaining = todo[done:]
        last_saved = done

        def save_progress(done_now: int) -> None:
            array.flush()
            broken_rows = np.flatnonzero(~good).tolist()
            atomic_write_text(files["progress"], json.dumps({**record, "done": done_now, "broken": broken_rows}))

        with reporter.progress("embedding", unit="images") as progress:
            progress(done, len(todo))
            for start, batch, ok in iter_embeddings(
                [absolute[i] for i in remaining], encoder, device, batch_size, workers, normalize, precision
            ):
                target = remaining[start : start + len(batch)]
                array[target] = batch.astype(self.dtype)
                good[target] = ok
                done_now = done + start + len(batch)
                progress(done_now, len(todo))
                if stop.signum is not None and done_now < len(todo):
                    save_progress(done_now)
                    reporter.info(
                        f"stopped after {done_now:,} of {len(todo):,} images; run the same command again to continue"
                    )
                    raise Stopped(stop.signum)
                if done_now - last_saved >= SAVE_EVERY_ROWS:
                    save_progress(done_now)
                    last_saved = done_now
        save_progress(len(todo))  # if publishing fails, the rerun publishes without embedding again
        return good

    def publish(self, good: np.ndarray, reporter: Reporter) -> None:
        """Put the vectors and the files beside them in place together: all of them, or, if a
        write fails, none (the earlier output stays whole)."""
        files, images = self.files, self.images
        broken = [Skipped(images[i].path, "undecodable at embedding time") for i in np.flatnonzero(~good)]
        keep = np.flatnonzero(good)
        skipped = self.manifest.skipped + broken
        with ExitStack() as writes:
            vectors, paths, skipped_list, meta = (
                writes.enter_context(atomic_path(path))
                for path in (self.out, files["paths"], files["skipped"], files["meta"])
            )
            try:
                self._write(vectors, paths, skipped_list, meta, keep, skipped)
            except OSError as exc:  # named once, here: the atomic writes then pass it on as it is
                raise write_failed(self.out, exc) from exc
        files["partial"].unlink(missing_ok=True)
        files["progress"].unlink(missing_ok=True)
        reporter.info(
            f"wrote {len(keep):,} × {self.dim} {self.settings['dtype']} to {self.out}; row order in "
            f"{files['paths']}" + (f"; {len(skipped):,} files skipped, listed in {files['skipped']}" if skipped else "")
        )

    def _write(
        self, vectors: Path, paths: Path, skipped_list: Path, meta: Path, keep: np.ndarray, skipped: list[Skipped]
    ) -> None:
        images, files = self.images, self.files
        paths.write_text(write_names(images[i].path for i in keep), encoding="utf-8")
        skipped_list.write_text("".join(f"{escape_name(s.path)}\t{s.reason}\n" for s in skipped), encoding="utf-8")
        meta.write_text(
            json.dumps(
                {
                    **self.settings,
                    "encoder": str(self.model.path or self.model.fingerprint),
                    "architecture": self.model.metadata["architecture"],
                    "stem": self.model.metadata.get("stem", "standard"),
                    "rows": len(keep),
                    "files": [self.keys[i] for i in keep],
                }
            ),
            encoding="utf-8",
        )
        if len(keep) < len(images):  # drop the rows of files that broke since the scan
            array = np.load(files["partial"], mmap_mode="r")
            final = allocated_memmap(vectors, self.dtype, (len(keep), self.dim))
            for begin in range(0, len(keep), SAVE_EVERY_ROWS):
                final[begin : begin + SAVE_EVERY_ROWS] = array[keep[begin : begin + SAVE_EVERY_ROWS]]
            final.flush()
        else:  # last, so that a failed write above leaves the finished partial array for the rerun
            os.replace(files["partial"], vectors)


def allocated_memmap(path: Path, dtype: np.dtype[Any] | type, shape: tuple[int, int]) -> np.memmap[Any, Any]:
    """A new .npy memory map whose disk space is reserved up front: on a full disk the error comes
    here, as an OSError, instead of as a crash (SIGBUS) at the first write into an unbacked page.
    A file that could not be reserved is removed."""
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        if hasattr(os, "posix_fallocate"):  # not on macOS
            with open(path, "r+b") as file:
                os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
    except OSError:
        Path(path).unlink(missing_ok=True)
        raise
    return array


def _partial_progress(files: dict[str, Path], record: dict[str, Any]) -> tuple[int, list[int]]:
    """(rows done, rows that did not decode) of an interrupted run of the same job; (0, []) if none."""
    if not (files["progress"].exists() and files["partial"].exists()):
        return 0, []
    try:
        previous = json.loads(files["progress"].read_text(encoding="utf-8"))
        if all(previous[key] == record[key] for key in ("settings", "paths_sha256")):
            return int(previous["done"]), [int(row) for row in previous.get("broken", [])]
    except (ValueError, KeyError, TypeError):
        pass
    return 0, []


def _paths_digest(images: list[ImageEntry], keys: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for image, key in zip(images, keys):
        digest.update(os.fsencode(f"{image.path}\0{key[0]}\0{key[1]}\n"))
    return digest.hexdigest()


def _reusable_rows(out: Path, files: dict[str, Path], settings: dict[str, Any]) -> dict[tuple[Any, ...], int]:
    """(path, size, mtime) -> row of an existing output made with the same encoder and settings."""
    if not (out.exists() and files["paths"].exists() and files["meta"].exists()):
        return {}
    try:
        meta = json.loads(files["meta"].read_text(encoding="utf-8"))
        if any(meta.get(k) != v for k, v in settings.items()):
            return {}
        paths = read_names(files["paths"].read_text(encoding="utf-8"))
        if len(paths) != len(meta["files"]) or np.load(out, mmap_mode="r").shape[0] != len(paths):
            return {}
        return {(p, size, mtime): row for row, (p, (size, mtime)) in enumerate(zip(paths, meta["files"]))}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
