"""One byolcli process at a time per run folder or embedding output.

An OS file lock (flock, on Linux and macOS) is held for as long as the command
runs. The operating system drops it when the process ends, however it ends, so
a crash or `kill -9` leaves no stale lock: the next run takes it normally. The lock file
stays in place (removing it would let two processes each lock a file of the same name) and
holds the holder's PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from byolcli.errors import UserError, WriteFailed


@contextlib.contextmanager
def exclusive(lock_file: Path, what: Path) -> Iterator[None]:
    """Hold the lock `lock_file` for the block; UserError naming `what` and the holder's PID
    if another process holds it."""
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WriteFailed(f"{lock_file}: could not create the lock file ({exc.strerror or exc})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise UserError(
                f"{what} is in use by another byol process (PID {holder}); "
                "wait for it to finish, or stop it, then run this again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
