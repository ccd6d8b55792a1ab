"""Errors of reading a FineTuneJob manifest or a trainer config (exit codes: ``api.contract``)."""

from __future__ import annotations


class SpecError(ValueError):
    """A FineTuneJob manifest is invalid. ``problems`` holds one ``field: message`` line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class ConfigError(ValueError):
    """A resolved trainer config can't be read or is invalid."""
