"""Failures the trainer knows how to name: each carries its exit code (``api.contract``)."""

from __future__ import annotations

from kubetune.api.contract import EXIT_CODE_REASONS, ExitCode


class TrainerFailure(Exception):
    """A failure with a cause a person can act on; the CLI turns it into an exit code."""

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or EXIT_CODE_REASONS[self.exit_code]


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
