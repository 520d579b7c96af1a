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
import io
import json
import os
import signal
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from byolcli.core.encoder import metadata_of
from byolcli.core.errors import Stopped, UserError
from byolcli.core.files import atomic_path, atomic_write_text, check_outside_input, write_failed
from byolcli.core.inference import autocast_dtype, iter_embeddings, pick_device
from byolcli.core.inputs import EMBEDDING_DTYPES, PRECISIONS, require_choice
from byolcli.core.locks import exclusive
from byolcli.core.model_choice import ModelChoice, choose_model
from byolcli.core.names import escape_name, read_names, write_names
from byolcli.core.scan import ImageEntry, Manifest, Skipped, scan
from byolcli.core.signals import StopRequests

if TYPE_CHECKING:
    import torch

    from byolcli.core.terminal import Reporter

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
    torch_device = pick_device(device)
    encoder = choice.load(torch_device)  # weights that do not fit are refused before any slow work
    settings = EmbedSettings(normalize, dtype, batch_size, workers, precision)
    embed_with(folder, out, choice, encoder, torch_device, settings, reporter)


@dataclass(frozen=True)
class EmbedSettings:
    normalize: bool = False
    dtype: str = "float32"
    batch_size: int = 256
    workers: int | None = None
    precision: str | None = None


def embed_with(
    folder: Path,
    out: Path,
    choice: ModelChoice,
    encoder: torch.nn.Module,
    device: torch.device,
    settings: EmbedSettings,
    reporter: Reporter,
    cache: bool = False,
) -> None:
    """Embed `folder` into `out` with an encoder already loaded. `cache`: `out` is byolcli's own copy of
    the folder's vectors, not a file the user named: its rows need not follow the folder's order, so
    images added since are appended in place, and a second command embedding the same folder waits
    for the first instead of being refused."""
    metadata = choice.metadata
    with reporter.progress("checking images") as progress:
        manifest = scan(folder, progress=progress, warn=reporter.warn)
    check_outside_input(out, manifest.root)
    files = sidecars(out)
    waiting = (
        (lambda pid: reporter.info(f"waiting for another byol process (PID {pid}) embedding {folder} …"))
        if cache
        else None
    )
    with exclusive(files["lock"], out, waiting):
        reporter.info(
            f"using encoder {choice.description} trained on {metadata['train_images']:,} images from "
            f"{metadata.get('source') or '?'} at {metadata.get('created', '?')}"
            if choice.kind == "encoder"
            else f"using {choice.description}"
        )
        exactness = str(autocast_dtype(device, settings.precision) or "fp32").replace("torch.", "")
        recorded = {
            "model": choice.fingerprint,
            "image_size": metadata["image_size"],
            "normalize": settings.normalize,
            "dtype": settings.dtype,
            "precision": exactness,
            "folder": str(manifest.root),
        }
        job = EmbedJob(manifest, out, files, choice, recorded, metadata["feature_dim"], appendable=cache)
        with StopRequests(
            lambda signum: reporter.warn(
                f"{signal.Signals(signum).name}: stopping after this batch to save what is embedded"
            )
        ) as stop:
            good = job.embed(encoder, device, settings, reporter, stop)
        job.publish(good, reporter)


@dataclass
class EmbedJob:
    """One embedding into `out`: the rows to compute, the partial array, the files beside it.

    Either the whole output is written anew (reusing the rows of unchanged images, in the folder's
    order), or, for an appendable output whose every row is still an image of the folder, only the
    new images are embedded and appended to it in place."""

    manifest: Manifest
    out: Path
    files: dict[str, Path]
    model: ModelChoice
    settings: dict[str, Any]
    dim: int
    appendable: bool = False

    def __post_init__(self) -> None:
        self.images = self.manifest.images
        self.keys = [[image.size, image.mtime_ns] for image in self.images]
        self.dtype = DTYPES[self.settings["dtype"]]
        self.earlier = _earlier_output(self.out, self.files, self.settings)
        reused = np.array(
            [self.earlier.rows.get((image.path, image.size, image.mtime_ns), -1) for image in self.images], dtype=int
        )
        self.todo = np.flatnonzero(reused < 0)  # images to embed, by index in the folder
        self.reused = reused
        # Appending keeps every earlier row: only where each of them is still an image of the folder.
        self.appending = (
            self.appendable
            and bool(self.earlier.rows)
            and (reused >= 0).sum() == self.earlier.count
            and grown_header(self.out, self.earlier.count + len(self.todo)) is not None
        )
        # Row of the partial array that each image to embed fills.
        self.slots = np.arange(len(self.todo)) if self.appending else self.todo

    def embed(
        self,
        encoder: torch.nn.Module,
        device: torch.device,
        settings: EmbedSettings,
        reporter: Reporter,
        stop: StopRequests,
    ) -> np.ndarray:
        """Fill the partial array (reusing rows of an earlier output, continuing an interrupted run);
        returns which of its rows decoded. Raises Stopped, with the progress saved, if asked to stop."""
        files, todo, slots = self.files, self.todo, self.slots
        rows = len(todo) if self.appending else len(self.images)
        # A partial run of exactly this job continues where it stopped.
        record = {
            "settings": self.settings,
            "paths_sha256": _paths_digest(self.images, self.keys),
            "appending": self.appending,
        }
        done, broken = _partial_progress(files, record)
        good = np.ones(rows, dtype=bool)
        good[broken] = False
        if done:
            array = np.load(files["partial"], mmap_mode="r+")
            reporter.info(f"continuing an interrupted embed: {done:,} of {len(todo):,} images already done")
        elif rows and (len(todo) or not self.appending):
            try:
                array = allocated_memmap(files["partial"], self.dtype, (rows, self.dim))
            except OSError as exc:
                raise write_failed(self.out, exc) from exc
            if self.earlier.rows and not self.appending:
                old = np.load(self.out, mmap_mode="r")
                for row in np.flatnonzero(self.reused >= 0):
                    array[row] = old[self.reused[row]]
        if self.earlier.rows and not done:
            unchanged = len(self.images) - len(todo)
            reporter.info(f"{unchanged:,} images unchanged since the last embed; embedding {len(todo):,}")
        if not len(todo):
            return good

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
                [absolute[i] for i in remaining],
                encoder,
                device,
                settings.batch_size,
                settings.workers,
                settings.normalize,
                settings.precision,
            ):
                target = slots[done + start : done + start + len(batch)]
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
        if self.appending:
            self._append(good, reporter)
            return
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
        self._wrote(len(keep), skipped, reporter)

    def _append(self, good: np.ndarray, reporter: Reporter) -> None:
        """Append the new images' rows to the output in place, then publish its row order: until that
        last step a reader sees the output as it was."""
        files, earlier = self.files, self.earlier
        new = [self.images[i] for i in self.todo[good]]
        broken = [Skipped(self.images[i].path, "undecodable at embedding time") for i in self.todo[~good]]
        skipped = self.manifest.skipped + broken
        skipped_text = _skipped_list(skipped)
        try:
            if new:
                append_rows(self.out, earlier.count, np.load(files["partial"], mmap_mode="r")[np.flatnonzero(good)])
            paths = earlier.paths + [image.path for image in new]
            keys = earlier.keys + [[image.size, image.mtime_ns] for image in new]
            if new or not files["skipped"].exists() or files["skipped"].read_text(encoding="utf-8") != skipped_text:
                atomic_write_text(files["skipped"], skipped_text)
            if new:
                atomic_write_text(files["paths"], write_names(paths))
                atomic_write_text(files["meta"], json.dumps(self._meta(len(paths), keys)))
        except OSError as exc:
            raise write_failed(self.out, exc) from exc
        files["partial"].unlink(missing_ok=True)
        files["progress"].unlink(missing_ok=True)
        if new:
            self._wrote(len(paths), skipped, reporter)

    def _wrote(self, rows: int, skipped: list[Skipped], reporter: Reporter) -> None:
        files = self.files
        reporter.info(
            f"wrote {rows:,} × {self.dim} {self.settings['dtype']} to {self.out}; row order in "
            f"{files['paths']}" + (f"; {len(skipped):,} files skipped, listed in {files['skipped']}" if skipped else "")
        )

    def _meta(self, rows: int, keys: list[list[int]]) -> dict[str, Any]:
        return {
            **self.settings,
            "encoder": str(self.model.path or self.model.fingerprint),
            "architecture": self.model.metadata["architecture"],
            "stem": self.model.metadata.get("stem", "standard"),
            "rows": rows,
            "files": keys,
        }

    def _write(
        self, vectors: Path, paths: Path, skipped_list: Path, meta: Path, keep: np.ndarray, skipped: list[Skipped]
    ) -> None:
        images, files = self.images, self.files
        paths.write_text(write_names(images[i].path for i in keep), encoding="utf-8")
        skipped_list.write_text(_skipped_list(skipped), encoding="utf-8")
        meta.write_text(json.dumps(self._meta(len(keep), [self.keys[i] for i in keep])), encoding="utf-8")
        if len(keep) < len(images):  # drop the rows of files that broke since the scan
            array = np.load(files["partial"], mmap_mode="r")
            final = allocated_memmap(vectors, self.dtype, (len(keep), self.dim))
            for begin in range(0, len(keep), SAVE_EVERY_ROWS):
                final[begin : begin + SAVE_EVERY_ROWS] = array[keep[begin : begin + SAVE_EVERY_ROWS]]
            final.flush()
        else:  # last, so that a failed write above leaves the finished partial array for the rerun
            os.replace(files["partial"], vectors)


def grown_header(npy: Path, rows: int) -> tuple[bytes, int, np.dtype[Any]] | None:
    """The header of the .npy file `npy` rewritten to count `rows` rows, with where its data begins and
    its dtype; None where it cannot be rewritten in place (another layout, or no room for the larger
    shape: NumPy leaves room for the first axis to grow)."""
    with open(npy, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if fortran or len(shape) != 2:
        return None
    header = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
    write(header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, shape[1])})
    return (header.getvalue(), offset, dtype) if header.tell() == offset else None


def append_rows(npy: Path, committed: int, rows: np.ndarray) -> None:
    """Write `rows` after the first `committed` rows of the .npy file `npy`, in place, and make its header
    count them (grown_header must allow it). The rows reach the disk before the header does, so a
    reader until then sees the array as it was."""
    grown = grown_header(npy, committed + len(rows))
    assert grown is not None, "append_rows on a header that cannot grow"
    header, offset, dtype = grown
    with open(npy, "r+b") as f:
        f.seek(offset + committed * rows.shape[1] * dtype.itemsize)
        f.write(np.ascontiguousarray(rows, dtype=dtype).tobytes())
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        f.write(header)
        f.flush()
        os.fsync(f.fileno())


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


def _skipped_list(skipped: list[Skipped]) -> str:
    return "".join(f"{escape_name(item.path)}\t{item.reason}\n" for item in skipped)


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


@dataclass
class EarlierOutput:
    """What an existing output made with the same encoder and settings holds: its first `count` rows
    (the header may count more, written by an append that did not finish) and their images."""

    paths: list[str]
    keys: list[list[int]]
    rows: dict[tuple[Any, ...], int]  # (path, size, mtime) -> row
    count: int


def _earlier_output(out: Path, files: dict[str, Path], settings: dict[str, Any]) -> EarlierOutput:
    none = EarlierOutput([], [], {}, 0)
    if not (out.exists() and files["paths"].exists() and files["meta"].exists()):
        return none
    try:
        meta = json.loads(files["meta"].read_text(encoding="utf-8"))
        if any(meta.get(k) != v for k, v in settings.items()):
            return none
        paths = read_names(files["paths"].read_text(encoding="utf-8"))
        keys = meta["files"]
        if len(paths) != len(keys) or np.load(out, mmap_mode="r").shape[0] < len(paths):
            return none
        rows = {(p, size, mtime): row for row, (p, (size, mtime)) in enumerate(zip(paths, keys))}
        return EarlierOutput(paths, keys, rows, len(paths))
    except (OSError, ValueError, KeyError, TypeError):
        return none
