"""Where byolcli writes, and how: never inside the input folder, always atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from byolcli.errors import UserError

RUNS_DIR = Path("byol-runs")


def default_run_dir(folder: Path) -> Path:
    """`./byol-runs/<folder name>/` under the current directory."""
    return RUNS_DIR / (folder.resolve().name or "root")


def cache_dir() -> Path:
    """Per-user cache for scan results: $BYOL_CACHE_DIR, else the XDG cache."""
    if env := os.environ.get("BYOL_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "byolcli"


def is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def check_outside_input(out: Path, folder: Path, what: str = "output") -> None:
    """Refuse to write into the folder the user asked us to read."""
    if is_inside(out, folder):
        raise UserError(f"{what} {out} is inside the input folder {folder}; choose another place with --out")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
