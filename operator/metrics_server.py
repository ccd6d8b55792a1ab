"""The operator's /metrics endpoint, for callers the Kubernetes API vouches for.

The metrics name every watched namespace's FineTuneJobs (their progress gauges), so they are
served as kube-rbac-proxy serves them: the caller sends a bearer token (a Prometheus
ServiceAccount's), the API says whose it is (TokenReview) and whether that identity may ``get``
the non-resource URL ``/metrics`` (SubjectAccessReview, granted by a ClusterRole with
``nonResourceURLs: [/metrics]``). A caller without a token gets 401, one without the right 403,
and neither a single series. Decisions are kept for a minute per token (by its sha256, never the
token itself), so a scrape every few seconds costs the API two requests a minute per scraper.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from kubetune.operator.kube import Kube

LOGGER: Final = logging.getLogger("kubetune.operator.metrics")
METRICS_PATH: Final = "/metrics"
TOKEN_REVIEWS: Final = "/apis/authentication.k8s.io/v1/tokenreviews"  # noqa: S105 -- a path
ACCESS_REVIEWS: Final = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
#: How long a token's answer (allowed, forbidden, unknown) is kept.
DECISION_SECONDS: Final = 60.0
_MAX_DECISIONS: Final = 1024


class Authorizer:
    """Whether a request's ``Authorization`` header may read /metrics: 200, 401 or 403 (503
    while the API can't say)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._decisions: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def decide(self, authorization: str | None) -> int:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return 401
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            cached = self._decisions.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            code = self._review(token)
        except Exception as exc:  # the API is unreachable: say so, decide nothing
            LOGGER.warning("reviewing a /metrics caller: %s", type(exc).__name__)
            return 503
        with self._lock:
            if len(self._decisions) >= _MAX_DECISIONS:
                self._decisions.clear()
            self._decisions[key] = (now + DECISION_SECONDS, code)
        return code

    def _review(self, token: str) -> int:
        review = self.kube.request(
            "POST",
            TOKEN_REVIEWS,
            body={
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token},
            },
        )
        status = review.get("status") or {}
        if not status.get("authenticated"):
            return 401
        user = status.get("user") or {}
        access = self.kube.request(
            "POST",
            ACCESS_REVIEWS,
            body={
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": user.get("username"),
                    "uid": user.get("uid"),
                    "groups": user.get("groups") or [],
                    "extra": user.get("extra") or {},
                    "nonResourceAttributes": {"path": METRICS_PATH, "verb": "get"},
                },
            },
        )
        return 200 if (access.get("status") or {}).get("allowed") else 403


_REFUSALS: Final = {
    401: b"Unauthorized: send a bearer token of an identity that may get /metrics\n",
    403: b"Forbidden: this identity may not get /metrics\n",
    404: b"Not found\n",
    503: b"The Kubernetes API could not review the caller; try again\n",
}


def serve(port: int, authorizer: Authorizer | None) -> ThreadingHTTPServer:
    """Serve /metrics on ``port`` in a daemon thread; ``authorizer`` None serves anyone."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            code = 404
            if path == METRICS_PATH:
                code = (
                    200
                    if authorizer is None
                    else authorizer.decide(self.headers.get("Authorization"))
                )
            if code == 200:
                body = generate_latest(REGISTRY)
                self._answer(200, CONTENT_TYPE_LATEST, body)
            else:
                self._answer(code, "text/plain; charset=utf-8", _REFUSALS[code])

        def _answer(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if code == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="kubetune-operator"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every few seconds is not news

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)  # noqa: S104 - the pod's port
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
