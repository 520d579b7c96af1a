"""The exceptions the CLI turns into one line of text instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a path, an image, a CSV, a model file.

    The message must name the thing and the problem in one line; the CLI prints
    it without a traceback (unless --debug) and exits with code 2.
    """


class TrainingFailed(Exception):
    """Training stopped for a reason the user must act on (e.g. the loss diverged).

    The last good checkpoint is kept; the CLI prints the message and exits with code 1.
    """


class PeerLost(TrainingFailed):
    """In a distributed run, a collective failed: another process died or hung."""


class OutOfMemoryAcrossRanks(TrainingFailed):
    """A process of a distributed run ran out of memory: every process must stop (the others wait
    in a collective it will never join), and the next start halves the batch for all of them.
    The CLI exits with EXIT_CODE, which `byol train --gpus` answers by starting the run again."""

    EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: try again


class PeerFailed(Exception):
    """In a distributed run, rank 0 stopped with an error during setup and has said why;
    the other ranks exit quietly, with rank 0's exit code (the exception's argument)."""

    @property
    def exit_code(self) -> int:
        return int(self.args[0]) if self.args else 1


class WriteFailed(Exception):
    """A file byolcli writes could not be written (disk full, quota, read-only folder).

    What was there before is kept and the partial file removed; the CLI prints the
    message and exits with code 1. Rerunning the command once the cause is gone continues.
    """


class Stopped(Exception):
    """Stopped by a signal (SIGINT, SIGTERM) at a safe point, with the work so far saved.

    The argument is the signal's number; the CLI exits with 128 + it, as a shell reports it.
    """

    @property
    def signum(self) -> int:
        return int(self.args[0])
