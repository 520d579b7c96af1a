"""One byolcli process at a time per run folder or embedding output.

An OS file lock (flock, on Linux and macOS) is held for as long as the command
runs. The operating system drops it when the process ends, however it ends, so
a crash or `kill -9` leaves no stale lock: the next run takes it normally. The lock file
holds the holder's PID and stays in place, except in a folder the lock itself made that is
still empty when it is released: then both go, so a refused command leaves nothing behind.
A process that locked a file which was removed meanwhile sees that it is no longer the file
at that path and locks the new one, so two holders can never each hold "the" lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from byolcli.core.errors import UserError, WriteFailed


@contextlib.contextmanager
def exclusive(lock_file: Path, what: Path, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock `lock_file` for the block. If another process holds it: without `waiting`, UserError
    naming `what` and the holder's PID; with it, call `waiting(PID)` and wait for the lock."""
    fd, made_folder = _locked(lock_file, what, waiting)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if made_folder and [entry.name for entry in os.scandir(lock_file.parent)] == [lock_file.name]:
            lock_file.unlink()  # while still held: a process waiting on it then sees it gone
            with contextlib.suppress(OSError):
                lock_file.parent.rmdir()
        os.close(fd)


def _locked(lock_file: Path, what: Path, waiting: Callable[[str], None] | None) -> tuple[int, bool]:
    """An open descriptor of `lock_file`, flocked, and still the file at that path; and whether its folder
    was made for it."""
    while True:
        made_folder = not lock_file.parent.exists()
        try:
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # its folder was removed as its holder let go between the two: make it again
        except OSError as exc:
            raise WriteFailed(f"{lock_file}: could not create the lock file ({exc.strerror or exc})") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                if waiting is None:
                    raise UserError(
                        f"{what} is in use by another byol process (PID {holder}); "
                        "wait for it to finish, or stop it, then run this again"
                    ) from None
                waiting(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, lock_file):
                return fd, made_folder
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed it as it let go: lock the file that is there now


def _same_file(fd: int, path: Path) -> bool:
    try:
        there = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)
