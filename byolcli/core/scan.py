"""Find the images in a folder and check that each one decodes.

The result is a Manifest: the good images (with format and size) and the
skipped files, each with the reason a user can act on. Validation runs in
worker processes for large folders and is cached per folder, keyed by each
file's relative path, size and mtime, so a rerun only reopens what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from byolcli.core.errors import UserError, WriteFailed
from byolcli.core.files import atomic_write_text, cache_dir, is_inside, os_error_behind
from byolcli.core.inputs import require_folder

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
HEIF_EXTENSIONS = {".heic", ".heif", ".avif"}
LITTER = {"__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information"}

# Below this short side a random crop has nothing left to learn from.
MIN_SIDE = 16

ZERO_BYTES = "zero bytes"
NOT_AN_IMAGE = "not an image"
UNDECODABLE = "truncated or undecodable"
TOO_MANY_PIXELS = "over the decompression-bomb limit"
TOO_SMALL = f"too small to crop (< {MIN_SIDE} px)"
NO_PERMISSION = "unreadable (permission denied)"
UNREADABLE_FOLDER = "unreadable folder"
BROKEN_LINK = "broken symbolic link (its target is gone)"

# Bump when validation rules change, so stale cached verdicts are not reused.
CACHE_VERSION = 1
# Below this many files to check, worker start-up costs more than it saves.
PARALLEL_THRESHOLD = 512
CHUNK = 256

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageEntry:
    path: str  # relative to the scanned folder, '/'-separated
    format: str
    width: int
    height: int
    size: int  # bytes
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class Manifest:
    root: Path
    images: list[ImageEntry]
    skipped: list[Skipped]
    ignored: int = 0  # files with extensions that are not images (.txt, .csv, ...)
    reused: int = 0  # verdicts taken from the cache instead of reopening the file
    cache_file: Path | None = None
    formats: Counter[str] = field(init=False)

    def __post_init__(self) -> None:
        self.formats = Counter(image.format for image in self.images)

    def reasons(self) -> Counter[str]:
        return Counter(s.reason for s in self.skipped)

    def absolute_paths(self) -> list[Path]:
        return [self.root / image.path for image in self.images]


def heif_available() -> bool:
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def scan(
    folder: str | Path,
    progress: Progress | None = None,
    use_cache: bool = True,
    warn: Callable[[str], None] | None = None,
) -> Manifest:
    """Scan `folder` recursively. Raises UserError when it is not a folder or holds no images.
    `warn` hears, once, that the verdicts could not be cached: the scan goes on without the cache."""
    require_folder(folder)
    root = Path(folder).resolve()
    extensions = EXTENSIONS | (HEIF_EXTENSIONS if heif_available() else set())

    candidates, skipped, ignored = _walk(root, extensions)
    cache_file = _cache_file(root) if use_cache else None
    cached = _load_cache(cache_file)

    verdicts: dict[str, tuple[Any, ...]] = {}
    to_check: list[tuple[str, int, int]] = []
    for rel, size, mtime in candidates:
        hit = cached.get(rel)
        if hit is not None and hit[0] == size and hit[1] == mtime:
            verdicts[rel] = hit
        else:
            to_check.append((rel, size, mtime))
    reused = len(verdicts)
    verdicts.update(_check_all(root, to_check, progress))

    images, bad = [], []
    for rel, _, _ in candidates:
        size, mtime, fmt, width, height, reason = verdicts[rel]
        if reason:
            bad.append(Skipped(rel, reason))
        else:
            images.append(ImageEntry(rel, fmt, width, height, size, mtime))
    if cache_file is not None and to_check:
        problem = _save_cache(cache_file, root, verdicts)
        if problem and warn:
            warn(f"scan cache: {problem}; this folder's checks will not be cached (BYOL_CACHE_DIR sets where)")

    manifest = Manifest(root, images, skipped + bad, ignored, reused, cache_file)
    if not images:
        found = f"{len(manifest.skipped)} unusable files" if manifest.skipped else "no image files"
        raise UserError(f"{folder}: no usable images ({found}; looked for {', '.join(sorted(extensions))})")
    return manifest


def _walk(root: Path, extensions: set[str]) -> tuple[list[tuple[str, int, int]], list[Skipped], int]:
    """Depth-first walk that follows symlinks once per real folder (loops end there)."""
    candidates: list[tuple[str, int, int]] = []
    skipped: list[Skipped] = []
    ignored = 0
    seen: set[tuple[int, int]] = set()
    stack = [""]
    st = root.stat()
    seen.add((st.st_dev, st.st_ino))
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(root / rel_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except PermissionError:
            skipped.append(Skipped(rel_dir or ".", UNREADABLE_FOLDER))
            continue
        except OSError as exc:
            skipped.append(Skipped(rel_dir or ".", f"{UNREADABLE_FOLDER} ({exc.strerror})"))
            continue
        subdirs = []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name in LITTER:
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                if entry.is_dir():
                    st = entry.stat()
                    key = (st.st_dev, st.st_ino)
                    if key not in seen:
                        seen.add(key)
                        subdirs.append(rel)
                    continue
                is_image_name = os.path.splitext(name)[1].lower() in extensions
                if not entry.is_file():
                    if entry.is_symlink() and is_image_name:  # a link whose target is gone
                        skipped.append(Skipped(rel, BROKEN_LINK))
                    continue
                if not is_image_name:
                    ignored += 1
                    continue
                st = entry.stat()
            except PermissionError:
                skipped.append(Skipped(rel, NO_PERMISSION))
                continue
            except OSError:  # the file vanished mid-walk
                continue
            candidates.append((rel, st.st_size, st.st_mtime_ns))
        stack.extend(reversed(subdirs))
    candidates.sort()
    return candidates, skipped, ignored


def check_image(path: str | Path, size: int) -> tuple[str, int, int, str]:
    """(format, width, height, reason) for one file; reason is '' when the image is good."""
    if size == 0:
        return "", 0, 0, ZERO_BYTES
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                width, height = img.size
                fmt = img.format or "?"
                if width * height > Image.MAX_IMAGE_PIXELS:
                    return fmt, width, height, TOO_MANY_PIXELS
                if min(width, height) < MIN_SIDE:
                    return fmt, width, height, TOO_SMALL
                # A full decode is the only reliable truncation check; a JPEG
                # decoded at 1/8 scale still reads every byte of the stream.
                img.draft("RGB", (MIN_SIDE, MIN_SIDE))
                img.load()
    except PermissionError:
        return "", 0, 0, NO_PERMISSION
    except Image.DecompressionBombError:
        return "", 0, 0, TOO_MANY_PIXELS
    except UnidentifiedImageError:
        return "", 0, 0, NOT_AN_IMAGE
    except Exception:  # noqa: BLE001 - any decoder failure means the same thing to the user
        return "", 0, 0, UNDECODABLE
    return fmt, width, height, ""


def _check_chunk(root: str, chunk: list[tuple[str, int, int]]) -> list[tuple[str, tuple[Any, ...]]]:
    heif_available()  # register the HEIF opener in worker processes too
    out = []
    for rel, size, mtime in chunk:
        fmt, width, height, reason = check_image(os.path.join(root, rel), size)
        out.append((rel, (size, mtime, fmt, width, height, reason)))
    return out


def _check_all(root: Path, todo: list[tuple[str, int, int]], progress: Progress | None) -> dict[str, tuple[Any, ...]]:
    done: dict[str, tuple[Any, ...]] = {}
    total = len(todo)
    if progress:
        progress(0, total)
    if total == 0:
        return done
    chunks = [todo[i : i + CHUNK] for i in range(0, total, CHUNK)]
    workers = min(os.cpu_count() or 1, len(chunks))
    if total < PARALLEL_THRESHOLD or workers == 1:
        _collect((_check_chunk(str(root), chunk) for chunk in chunks), done, total, progress)
    else:
        # spawn, not fork: the caller may already hold torch's thread pools.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            _collect(pool.map(_check_chunk, [str(root)] * len(chunks), chunks), done, total, progress)
    return done


def _collect(
    results: Iterable[list[tuple[str, tuple[Any, ...]]]], done: dict[str, Any], total: int, progress: Progress | None
) -> None:
    for chunk_result in results:
        done.update(chunk_result)
        if progress:
            progress(len(done), total)


def _cache_file(root: Path) -> Path | None:
    folder = cache_dir() / "scans"
    if is_inside(folder, root):  # never write inside the input folder
        return None
    digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:20]
    return folder / f"{digest}.json"


def _load_cache(cache_file: Path | None) -> dict[str, tuple[Any, ...]]:
    if cache_file is None:
        return {}
    try:
        if not cache_file.exists():
            return {}
        data = json.loads(cache_file.read_text(encoding="utf-8"))
        if data.get("version") != CACHE_VERSION:
            return {}
        return {rel: tuple(v) for rel, v in data["entries"].items()}
    except (OSError, ValueError, KeyError, AttributeError):
        return {}  # a damaged cache only costs a full re-check


def _save_cache(cache_file: Path, root: Path, verdicts: dict[str, tuple[Any, ...]]) -> str | None:
    """Write the verdicts; returns what went wrong, if anything. A cache only saves time: a
    folder that cannot be written (read-only home, full disk) must not fail the scan."""
    data = {"version": CACHE_VERSION, "root": str(root), "entries": verdicts}
    try:
        atomic_write_text(cache_file, json.dumps(data, separators=(",", ":")))
    except (OSError, WriteFailed) as exc:
        cause = os_error_behind(exc) or exc
        return f"could not write {cache_file} ({getattr(cause, 'strerror', None) or cause})"
    return None
