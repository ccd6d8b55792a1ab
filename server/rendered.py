"""Each FineTuneJob's OpenAI JSON, encoded once per resourceVersion: a read of a job that hasn't
changed since it was last shown re-renders and re-encodes nothing (that was two thirds of a list
page's CPU in the server, docs/performance.md). Keyed by namespace, name and resourceVersion,
never by caller: the job a caller is shown still comes from the read that their access review
allowed, only its encoding is reused."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from kubetune.server import mapping

#: Jobs held at most; past it the memo starts again empty (it refills on the next reads).
MAX_ENTRIES = 50_000


def encode(value: Any) -> bytes:
    """JSON as Starlette's ``JSONResponse`` writes it."""
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode()


class RenderedJobs:
    """``job_json(job)``: ``mapping.openai_job(job, template)`` encoded, from the memo while the
    job's resourceVersion is the one it was encoded at."""

    def __init__(self, template: Mapping[str, Any]) -> None:
        self.template = template
        self.held: dict[tuple[str, str], tuple[str, bytes]] = {}

    def job_json(self, job: Mapping[str, Any]) -> bytes:
        meta = job["metadata"]
        key = (str(meta.get("namespace", "")), str(meta["name"]))
        version = str(meta.get("resourceVersion") or "")
        held = self.held.get(key)
        if held is not None and version and held[0] == version:
            return held[1]
        encoded = encode(mapping.openai_job(job, self.template))
        if version:
            if len(self.held) >= MAX_ENTRIES:
                self.held.clear()
            self.held[key] = (version, encoded)
        return encoded

    def page_json(self, jobs: Sequence[Mapping[str, Any]], has_more: bool) -> bytes:
        """OpenAI's list envelope (``context.list_of``) around the jobs' encoded JSON."""
        ids = [str(job["metadata"]["name"]) for job in jobs]
        return b"".join((
            b'{"object":"list","data":[', b",".join(map(self.job_json, jobs)),
            b'],"has_more":', b"true" if has_more else b"false",
            b',"first_id":', encode(ids[0] if ids else None),
            b',"last_id":', encode(ids[-1] if ids else None), b"}",
        ))  # fmt: skip


__all__ = ["RenderedJobs", "encode"]
