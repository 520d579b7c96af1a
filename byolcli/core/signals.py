"""Ctrl-C and SIGTERM as requests to stop at the next safe point.

A terminal sends SIGINT on Ctrl-C; cluster schedulers (SLURM, Kubernetes) send
SIGTERM some time before they kill a job. Either one marks the request; the
command finishes the step or batch in progress, saves what it has and raises
`Stopped`, which the CLI turns into exit code 128 + the signal's number.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """While entered, SIGINT and SIGTERM set `signum` instead of ending the process.

    `on_request(signum)` is told of the first one. A second signal raises
    KeyboardInterrupt (quit now, keep what was saved) when `second_quits`; a
    launcher that forwards one signal to every process as well as the terminal's
    own needs it off.
    """

    def __init__(self, on_request: Callable[[int], None] | None = None, second_quits: bool = True) -> None:
        self.signum: int | None = None
        self.on_request = on_request
        self.second_quits = second_quits
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if self.second_quits:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.on_request:
            self.on_request(signum)
