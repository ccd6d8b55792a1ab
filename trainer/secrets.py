"""The hub tokens: where they come from, and the guard that keeps them out of everything a run
writes (log lines, tracebacks, result.json, the termination message, the model card).

A secret is redacted in every form it could take on its way out: as read (a mounted Secret often
ends in a newline), stripped (as it is used), URL-encoded (in a query string or a path), and
escaped the way ``repr`` and JSON quote it. Credentials written into a URI (userinfo, a presigned
URL's query string) are secrets too: they are removed from every URI shown (``display_uri``), and
redacted wherever a library quotes the URI whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.contract import (
    AWS_SECRET_ACCESS_KEY_ENV,
    AWS_SESSION_TOKEN_ENV,
    PUSH_TOKEN_ENV,
    TOKEN_ENV,
)
from kubetune.api.models import TrainerResult
from kubetune.trainer.errors import InvalidConfig

REDACTED = "***"
#: Shorter values would redact innocent text; a real token or password is never this short.
MIN_SECRET_LENGTH = 8


@dataclass(frozen=True)
class HubTokens:
    """The tokens of one run, read once and stripped: ``read`` for the model and dataset,
    ``push`` for ``output.pushToHub`` (the read token where no push token is given).
    ``also_secret`` holds values that are never used but must never be shown either: the tokens
    as read (before stripping) and credentials inside the run's URIs."""

    read: str | None = None
    push: str | None = None
    also_secret: tuple[str, ...] = field(default=(), repr=False)

    def __repr__(self) -> str:
        # A dataclass repr would print the tokens into any log line or traceback that shows us.
        return f"HubTokens(read={_shown(self.read)}, push={_shown(self.push)})"

    @property
    def for_push(self) -> str | None:
        return self.push or self.read

    @property
    def secrets(self) -> list[str]:
        """Every form of every secret value of the run, longest first."""
        values = [t for t in (self.read, self.push, *self.also_secret) if t]
        return secret_forms(values)

    def with_secrets(self, values: Iterable[str]) -> HubTokens:
        """These tokens, and ``values`` to keep out of everything too (tracking credentials)."""
        return HubTokens(self.read, self.push, self.also_secret + tuple(v for v in values if v))

    def with_uri_credentials(self, uris: Iterable[str]) -> HubTokens:
        found = tuple(c for uri in uris for c in uri_credentials(uri))
        return HubTokens(self.read, self.push, self.also_secret + found)


def _shown(token: str | None) -> str:
    return REDACTED if token else "None"


def resolve_hub_tokens(token_file: str | None) -> HubTokens:
    """The read token from ``token_file`` (a mounted Secret) if given, else from ``$HF_TOKEN``;
    the push token from ``$HF_PUSH_TOKEN``. Each is stripped of surrounding whitespace (a Secret
    made with ``echo`` ends in a newline, and the hub would refuse it)."""
    raw_read = _read_token_file(token_file) if token_file else os.environ.get(TOKEN_ENV)
    raw_push = os.environ.get(PUSH_TOKEN_ENV)
    raw = tuple(t for t in (raw_read, raw_push) if t and t != t.strip())
    return HubTokens(read=_stripped(raw_read), push=_stripped(raw_push), also_secret=raw)


#: The object store's secrets, set from ``spec.objectStore``'s Secret references: the trainer
#: never handles them (the S3 client reads them), but a library could quote them.
_STORE_SECRET_ENV = (AWS_SECRET_ACCESS_KEY_ENV, AWS_SESSION_TOKEN_ENV)


def object_store_secrets(environ: Any = None) -> list[str]:
    """The object store's secret key and session token in the environment, never to be shown."""
    environ = os.environ if environ is None else environ
    return [environ[name] for name in _STORE_SECRET_ENV if environ.get(name)]


def _read_token_file(token_file: str) -> str:
    try:
        return Path(token_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        # The path is safe to name; the content never is.
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidConfig(f"cannot read tokenFile {token_file}: {why}") from None


def _stripped(token: str | None) -> str | None:
    return (token or "").strip() or None


def uri_credentials(uri: str) -> list[str]:
    """The secret parts of a URI: its userinfo (user, password, both) and its query string
    (whole, and each value: a presigned URL's signature and credential)."""
    if "://" not in uri:
        return []
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return []
    found: list[str] = []
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at:
        found.append(userinfo)
        user, _, password = userinfo.partition(":")
        found += [urllib.parse.unquote(user), urllib.parse.unquote(password), user, password]
    if parts.query:
        found.append(parts.query)
        for _, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=False):
            found.append(value)
            found.append(urllib.parse.quote(value, safe=""))
    if parts.fragment:
        found.append(parts.fragment)
    return [f for f in found if f]


def secret_forms(values: Iterable[str]) -> list[str]:
    """Each value as it may appear in text: raw, stripped, URL-encoded (either hex case, with
    ``+`` or ``%20`` for spaces), and escaped as ``repr`` and JSON write it. Longest first, so a
    longer form is redacted before a shorter one inside it would break it up."""
    forms: set[str] = set()
    for value in values:
        for form in {value, value.strip()}:
            encoded = {
                urllib.parse.quote(form, safe=""),
                urllib.parse.quote(form),
                urllib.parse.quote_plus(form),
            }
            encoded |= {re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), e) for e in encoded}
            escaped = {json.dumps(form)[1:-1], repr(form)[1:-1]}
            forms |= {form} | encoded | escaped
    kept = (f for f in forms if len(f.strip()) >= MIN_SECRET_LENGTH)
    return sorted(kept, key=len, reverse=True)


class RedactSecrets(logging.Filter):
    """Replaces each secret value in a record's rendered message with ``***``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if len(s.strip()) >= MIN_SECRET_LENGTH]

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
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


_BINARY_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".model", ".gguf"})


def redact_text_files(folder: Path, secrets: list[str]) -> None:
    """Redact every text file directly in ``folder`` (what a save wrote: tokenizer files, chat
    template, configs), in place. The tokenizer copies what the model folder held, and that is
    published: a secret that reached it (a template that quotes a token) must not go along.
    Binary files (weights, a SentencePiece model) are left as they are."""
    if not secrets:
        return
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink()):
        if path.suffix in _BINARY_SUFFIXES:
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        cleaned = redact(text, secrets)
        if cleaned != text:
            path.write_text(cleaned, encoding="utf-8")


def redact_result(result: TrainerResult, secrets: list[str]) -> TrainerResult:
    """``result`` with every secret removed from every string in it (message, URIs, samples)."""
    if not secrets:
        return result
    data = result.model_dump(by_alias=True, mode="json")
    return TrainerResult.model_validate(_redact_strings(data, secrets))


#: Fields of a fixed vocabulary: no secret is ever there, and redacting a query value that
#: happens to spell one (``?state=Succeeded``) would make the result invalid.
_VOCABULARY_FIELDS = frozenset({"outcome", "reason"})


def _redact_strings(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {
            k: v if k in _VOCABULARY_FIELDS else _redact_strings(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_strings(v, secrets) for v in value]
    return value


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
