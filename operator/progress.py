"""The progress endpoint: trainers report here, and the operator writes ``status.progress``.

A trainer pod has no Kubernetes API identity. It POSTs its progress (``PROGRESS_PATH``) over
HTTPS with a projected ServiceAccount token of kubetune's own audience, bound to the pod. The
operator asks the API whose token it is (a TokenReview with that audience: a token of any other
audience, or of no live pod, is refused), reads the pod's name and uid from the bound token's
extra info, and accepts the report only when that pod is one its index holds for the job the
body names, owned by that job's trainer Job. The report then waits in memory, newest first,
and goes into the job's next status write, at most once per ``progress_interval_seconds``,
coalesced with the operator's own status changes.

A standby replica can't write, so it answers 503 and the trainer retries (its next try may
reach the leader: the Service selects every replica). Unknown tokens cost a TokenReview each,
so those are rate-limited for all callers together (429); a known token's answer is kept for
a minute, by its sha256 (never the token itself); bodies are bounded (``PROGRESS_BODY_LIMIT``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from kubetune.api.contract import PROGRESS_BODY_LIMIT, PROGRESS_PATH
from kubetune.api.documents import load_json_from_a_pod
from kubetune.api.models import Progress
from kubetune.api.token_buckets import TokenBuckets
from kubetune.operator.kube import Kube
from kubetune.operator.metrics_server import TOKEN_REVIEWS
from kubetune.operator.names import owned_by, owned_validation_job
from kubetune.operator.objects import Key, Obj

LOGGER: Final = logging.getLogger("kubetune.operator.progress")
#: How long a token's review (who it is, or that it is nobody) is kept.
REVIEW_SECONDS: Final = 60.0
_MAX_REVIEWS: Final = 4096
_POD_NAME: Final = "authentication.kubernetes.io/pod-name"
_POD_UID: Final = "authentication.kubernetes.io/pod-uid"
_SA_PREFIX: Final = "system:serviceaccount:"
#: Reports one pod may send a second (in bursts of ``PER_POD_BURST``): a trainer reports every
#: few seconds, so more is a pod flooding the operator's event loop.
PER_POD_REPORTS_PER_SECOND: Final = 2.0
PER_POD_BURST: Final = 5.0


@dataclass(frozen=True)
class PodIdentity:
    """Who a progress token belongs to: a ServiceAccount, and the pod it is bound to."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str


class Overloaded(Exception):
    """Too many unknown tokens to review right now."""


class TokenReviewer:
    """Token → the pod it is bound to (None: not a live token of ``audience`` bound to a pod),
    through the API's TokenReview, kept a minute per token."""

    def __init__(self, kube: Kube, audience: str, reviews_per_second: float) -> None:
        self.kube = kube
        self.audience = audience
        #: One bucket for all callers together.
        self._budget = TokenBuckets(rate=reviews_per_second, burst=reviews_per_second)
        self._reviews: dict[str, tuple[float, PodIdentity | None]] = {}

    def cached(self, token: str) -> tuple[bool, PodIdentity | None]:
        entry = self._reviews.get(_digest(token))
        if entry is not None and entry[0] > time.monotonic():
            return True, entry[1]
        return False, None

    def admit(self) -> None:
        """Take one review from the shared budget, or raise Overloaded."""
        if not self._budget.allow():
            raise Overloaded

    def remember(self, token: str, identity: PodIdentity | None) -> None:
        if len(self._reviews) >= _MAX_REVIEWS:
            now = time.monotonic()
            self._reviews = {k: v for k, v in self._reviews.items() if v[0] > now}
            if len(self._reviews) >= _MAX_REVIEWS:
                self._reviews.clear()
        self._reviews[_digest(token)] = (time.monotonic() + REVIEW_SECONDS, identity)

    def review(self, token: str) -> PodIdentity | None:
        """Blocking: ask the API (failures raise)."""
        answer = self.kube.request(
            "POST",
            TOKEN_REVIEWS,
            body={
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]},
            },
        )
        return identity_of(answer.get("status") or {}, self.audience)


def identity_of(status: Mapping[str, Any], audience: str) -> PodIdentity | None:
    """The pod a TokenReview's status names, if the token is authenticated for ``audience``
    and bound to a pod."""
    if not status.get("authenticated") or audience not in (status.get("audiences") or []):
        return None
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    if not username.startswith(_SA_PREFIX):
        return None
    namespace, _, account = username.removeprefix(_SA_PREFIX).partition(":")
    extra = user.get("extra") or {}
    names, uids = extra.get(_POD_NAME) or [], extra.get(_POD_UID) or []
    if not namespace or not account or len(names) != 1 or len(uids) != 1:
        return None
    return PodIdentity(namespace, account, str(names[0]), str(uids[0]))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_report(body: bytes) -> tuple[Mapping[str, Any], Key, Progress]:
    """A report's job (namespace, name and maybe uid), its key and its progress; ValueError for
    a body of any other shape (JSON nested past Python's limit among them)."""
    try:
        report = load_json_from_a_pod(body, "a progress report")
        job = report["job"]
        key = (str(job["namespace"]), str(job["name"]))
        progress = Progress.model_validate(report["progress"])
    except (ValueError, KeyError, TypeError) as exc:  # ValidationError is a ValueError
        raise ValueError(f"not a progress report: {type(exc).__name__}") from None
    # JSON indexable by "namespace" and "name" is an object: any other job failed just above.
    return job, key, progress


def reporting_job(
    identity: PodIdentity,
    job: Mapping[str, Any],
    service_account: str,
    *,
    ftj: Obj | None,
    jobs: list[Obj],
    pods: list[Obj],
    jobsets: list[Obj],
) -> str | None:
    """Why the pod of ``identity`` may not report for ``job`` (the body's namespace, name and
    uid) as the indexes hold it, or None when it may: the pod is in the job's namespace, runs as
    the trainer ServiceAccount, is one of the job's pods by name and uid, and is owned by a Job
    the FineTuneJob owns (or its JobSet does), never the Validating phase's."""
    if identity.namespace != job.get("namespace") or identity.service_account != service_account:
        return "the token is not a trainer's of this job's namespace"
    if ftj is None:
        return "no such FineTuneJob"
    uid = str(ftj["metadata"].get("uid"))
    if job.get("uid") not in (None, uid):
        return "the FineTuneJob is another one now"
    pod = next(
        (
            p
            for p in pods
            if p["metadata"].get("name") == identity.pod_name
            and p["metadata"].get("uid") == identity.pod_uid
        ),
        None,
    )
    if pod is None:
        return "the token's pod is not one of this job's"
    owners = {uid} | {str(s["metadata"].get("uid")) for s in jobsets if owned_by(s, uid)}
    validation = owned_validation_job(ftj, jobs)
    trainers = [
        j for j in jobs if any(owned_by(j, owner) for owner in owners) and j is not validation
    ]
    if not any(owned_by(pod, str(j["metadata"].get("uid"))) for j in trainers):
        return "the token's pod is not one of this job's trainer pods"
    return None


def _final(progress: Mapping[str, Any]) -> bool:
    total, step = progress.get("totalSteps"), progress.get("step")
    return isinstance(total, int) and isinstance(step, int) and total > 0 and step >= total


#: (FineTuneJob, Jobs, Pods, JobSets) of a key, as the operator's indexes hold them.
Lookup = Callable[[Key], tuple[Obj | None, list[Obj], list[Obj], list[Obj]]]


class ProgressInbox:
    """The newest accepted progress of each job, until a status write takes it."""

    def __init__(self, interval_seconds: float) -> None:
        self.interval = interval_seconds
        self._pending: dict[Key, Obj] = {}
        self._written_at: dict[Key, float] = {}

    def put(self, key: Key, progress: Obj) -> float:
        """Keep ``progress`` for ``key``; seconds until it may be written. The run's last step
        is written at once: the trainer exits after it, and an operator that stopped before
        writing it would leave the status a step short."""
        self._pending[key] = progress
        if _final(progress):
            self._written_at.pop(key, None)
        last = self._written_at.get(key)
        return 0.0 if last is None else max(0.0, last + self.interval - time.monotonic())

    def take(self, key: Key) -> Obj | None:
        """The progress to write with this reconcile (None: none, or not due yet)."""
        progress = self._pending.get(key)
        if progress is None:
            return None
        last = self._written_at.get(key)
        if last is not None and time.monotonic() - last < self.interval:
            return None
        del self._pending[key]
        self._written_at[key] = time.monotonic()
        return progress

    def due_in(self, key: Key) -> float | None:
        if key not in self._pending:
            return None
        last = self._written_at.get(key)
        return 0.0 if last is None else max(0.0, last + self.interval - time.monotonic())

    def give_back(self, key: Key, progress: Obj) -> None:
        """A write that failed: keep its progress unless a newer one came."""
        self._pending.setdefault(key, progress)
        self._written_at.pop(key, None)

    def forget(self, key: Key) -> None:
        self._pending.pop(key, None)
        self._written_at.pop(key, None)


class ProgressEndpoint:
    """The HTTP side: review, check, keep, schedule the write."""

    def __init__(
        self,
        reviewer: TokenReviewer,
        *,
        inbox: ProgressInbox,
        lookup: Lookup,
        service_account: str,
        is_leader: Callable[[], bool],
        schedule: Callable[[Key, float], None],
    ) -> None:
        self.reviewer = reviewer
        self.inbox = inbox
        self.lookup = lookup
        self.service_account = service_account
        self.is_leader = is_leader
        self.schedule = schedule
        self.per_pod = TokenBuckets(rate=PER_POD_REPORTS_PER_SECOND, burst=PER_POD_BURST)
        #: (pod uid, job) refusals logged in the last minute: a pod that keeps trying is one line.
        self._logged: dict[tuple[str, Key], float] = {}

    async def handle(self, request: web.Request) -> web.Response:
        if not self.is_leader():
            # Only the leader writes status: the trainer tries again (maybe the leader, next).
            return _answer(503, "this replica stands by; try again", retry_after=1)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _answer(401, "send the pod's progress token as a bearer token")
        if (request.content_length or 0) > PROGRESS_BODY_LIMIT:
            return _answer(413, f"a progress report is at most {PROGRESS_BODY_LIMIT} bytes")
        known, identity = self.reviewer.cached(token)
        if not known:
            try:
                self.reviewer.admit()
            except Overloaded:
                return _answer(429, "too many unknown tokens; try again", retry_after=1)
            loop = asyncio.get_running_loop()
            try:
                identity = await loop.run_in_executor(None, self.reviewer.review, token)
            except Exception as exc:  # the API can't say now: decide nothing
                LOGGER.warning("reviewing a progress token: %s", type(exc).__name__)
                return _answer(503, "the Kubernetes API could not review the token; try again")
            self.reviewer.remember(token, identity)
        if identity is None:
            return _answer(401, f"not a live pod-bound token of audience {self.reviewer.audience}")
        if not self.per_pod.allow(identity.pod_uid):
            return _answer(429, "too many reports from this pod; try again", retry_after=1)
        try:
            job, key, progress = read_report(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return _answer(413, f"a progress report is at most {PROGRESS_BODY_LIMIT} bytes")
        except ValueError:
            return _answer(400, "the body must be {job: {namespace, name, uid}, progress: {...}}")
        ftj, jobs, pods, jobsets = self.lookup(key)
        refused = reporting_job(
            identity, job, self.service_account, ftj=ftj, jobs=jobs, pods=pods, jobsets=jobsets
        )
        if refused is not None:
            if self._first_in_a_minute((identity.pod_uid, key)):
                LOGGER.warning(
                    "progress for %s/%s from pod %s/%s refused: %s",
                    key[0], key[1], identity.namespace, identity.pod_name, refused,
                )  # fmt: skip
            return _answer(403, refused)
        value = progress.model_dump(by_alias=True, exclude_none=True, mode="json")
        self.schedule(key, self.inbox.put(key, value))
        return _answer(202, "accepted")

    def _first_in_a_minute(self, what: tuple[str, Key]) -> bool:
        now = time.monotonic()
        if len(self._logged) >= _MAX_REVIEWS:
            self._logged = {k: t for k, t in self._logged.items() if t > now}
        if self._logged.get(what, 0.0) > now:
            return False
        self._logged[what] = now + 60.0
        return True


def _answer(code: int, message: str, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response({"message": message}, status=code, headers=headers)


async def serve(
    endpoint: ProgressEndpoint,
    port: int,
    cert_file: str | None = None,
    key_file: str | None = None,
    *,
    reuse_port: bool = False,
) -> web.AppRunner:
    """Serve the endpoint on ``port`` (HTTPS with ``cert_file``) on this event loop."""
    app = web.Application(client_max_size=PROGRESS_BODY_LIMIT)
    app.router.add_post(PROGRESS_PATH, endpoint.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = None
    if cert_file:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
    site = web.TCPSite(
        runner,
        "0.0.0.0",  # noqa: S104 - the pod's port
        port,
        ssl_context=context,
        reuse_port=reuse_port or None,
    )
    await site.start()
    return runner
