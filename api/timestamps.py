"""Timestamps as Kubernetes writes them: RFC 3339 in UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(moment: datetime | None = None, *, micros: bool = False) -> str:
    """``moment`` (now when None) as ``2026-11-28T16:33:39Z``; with ``micros`` as a
    MicroTime (``...39.123456Z``, the form Leases and Events take)."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micros else "%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
