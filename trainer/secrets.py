"""The hub tokens: where they come from, and the guard that keeps them out of every log line."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.contract import PUSH_TOKEN_ENV, TOKEN_ENV
from kubetune.trainer.errors import InvalidConfig

REDACTED = "***"


@dataclass(frozen=True)
class HubTokens:
    """The tokens of one run, read once: ``read`` for the model and dataset, ``push`` for
    ``output.pushToHub`` (the read token where no push token is given)."""

    read: str | None = None
    push: str | None = None

    @property
    def for_push(self) -> str | None:
        return self.push or self.read

    @property
    def secrets(self) -> list[str]:
        return [t for t in (self.read, self.push) if t]


def resolve_hub_tokens(token_file: str | None) -> HubTokens:
    """The read token from ``token_file`` (a mounted Secret) if given, else from ``$HF_TOKEN``;
    the push token from ``$HF_PUSH_TOKEN``."""
    return HubTokens(
        read=resolve_hub_token(token_file), push=os.environ.get(PUSH_TOKEN_ENV) or None
    )


def resolve_hub_token(token_file: str | None) -> str | None:
    """The token from ``token_file`` (a mounted Secret) if given, else from ``$HF_TOKEN``."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            # The path is safe to name; the content never is.
            raise InvalidConfig(f"cannot read tokenFile {token_file}: {exc.strerror}") from exc
        return token or None
    return os.environ.get(TOKEN_ENV) or None


class RedactSecrets(logging.Filter):
    """Replaces each secret value in a record's rendered message with ``***``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Short values would redact innocent text; a real token is never this short.
        self.secrets = [s for s in secrets if len(s) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        redacted = redact(message, self.secrets)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # A traceback can quote a token (a URL, an argument); render it now, redacted, and
            # formatters reuse this text instead of rendering the raw one.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def install_redaction(secrets: list[str]) -> RedactSecrets:
    """Guard every handler of the root logger (and those added later through it)."""
    guard = RedactSecrets(secrets)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(guard)
    root.addFilter(guard)
    return guard


def uninstall_redaction(guard: RedactSecrets) -> None:
    root = logging.getLogger()
    for handler in root.handlers:
        handler.removeFilter(guard)
    root.removeFilter(guard)
