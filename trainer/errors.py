"""Failures the trainer knows how to name: each carries its exit code (``api.contract``)."""

from __future__ import annotations

from kubetune.api.contract import EXIT_CODE_REASONS, ExitCode


class TrainerFailure(Exception):
    """A failure with a cause a person can act on; the CLI turns it into an exit code.

    ``message`` goes to the termination message, which the operator copies into the job's status
    for anyone who may read the job: it names fields, files, line numbers and status codes, never
    what a tenant's host or data said (a column name, a header line, a response body: a URI may
    point the trainer at a service the tenant can't reach, and its answer must not come back
    through the status). ``detail`` is that content, for the trainer's own log only.
    """

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str, reason: str | None = None, *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or EXIT_CODE_REASONS[self.exit_code]
        self.detail = detail

    def log_line(self) -> str:
        """What the trainer's own log says: the message, and the detail behind it."""
        line = f"{self.reason}: {self.message}"
        return f"{line} ({self.detail})" if self.detail else line


class InvalidConfig(TrainerFailure):
    exit_code = ExitCode.INVALID_CONFIG


class DatasetUnusable(TrainerFailure):
    exit_code = ExitCode.DATASET


class ModelUnusable(TrainerFailure):
    exit_code = ExitCode.MODEL


class OutOfMemory(TrainerFailure):
    exit_code = ExitCode.OUT_OF_MEMORY


class Diverged(TrainerFailure):
    """The loss became NaN or infinite: the same data and settings would diverge again."""

    exit_code = ExitCode.DIVERGED


def first_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of an exception's message (its type when it has none), for a one-line
    reason in a log, a message or the result; the traceback goes to the log, not here."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
