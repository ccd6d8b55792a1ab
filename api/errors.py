"""Errors and exit codes shared by the trainer, the operator and the CLI."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """The trainer's exit codes (DESIGN.md): they tell the Job which failures a retry can't fix."""

    SUCCEEDED = 0
    UNEXPECTED = 1
    INVALID_CONFIG = 2
    DATASET = 3
    MODEL = 4
    OUT_OF_MEMORY = 5


#: Failure reasons as they appear in the termination message and in status conditions.
EXIT_CODE_REASONS: dict[ExitCode, str] = {
    ExitCode.UNEXPECTED: "TrainerError",
    ExitCode.INVALID_CONFIG: "InvalidConfig",
    ExitCode.DATASET: "DatasetError",
    ExitCode.MODEL: "ModelError",
    ExitCode.OUT_OF_MEMORY: "OutOfMemory",
}

#: Exit codes a retry can't fix: the operator's podFailurePolicy fails the Job on these at once.
NON_RETRIABLE_EXIT_CODES: tuple[int, ...] = (
    ExitCode.INVALID_CONFIG,
    ExitCode.DATASET,
    ExitCode.MODEL,
    ExitCode.OUT_OF_MEMORY,
)


class SpecError(ValueError):
    """A FineTuneJob manifest is invalid. ``problems`` holds one ``field: message`` line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class ConfigError(ValueError):
    """A resolved trainer config can't be read or is invalid."""
