"""Where byolcli writes, and how: never inside the input folder, always atomically."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from byolcli.core.errors import UserError, WriteFailed

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
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    A write that fails (a full disk, say) leaves `path` as it was and raises WriteFailed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            # mkstemp makes the file private (0600); others may read what byolcli writes as they could
            # read any file the user makes: a teammate loads the encoder, a web server serves the report.
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_failed(path, exc) from exc
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        cause = None if isinstance(exc, WriteFailed) else os_error_behind(exc)  # named by whoever raised it
        if cause is None:
            raise
        raise write_failed(path, cause) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it, so it is set back at once
    os.umask(mask)
    return mask


def os_error_behind(exc: BaseException | None) -> OSError | None:
    """The OSError that caused `exc`, if any: torch.save reports a failed write as a
    RuntimeError raised while handling the file's OSError."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def write_failed(path: Path, exc: OSError) -> WriteFailed:
    return WriteFailed(
        f"{path}: could not write it ({exc.strerror or exc}); the previous version, if any, is "
        "kept. Free space (or fix the folder) and run the same command again to continue"
    )


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
