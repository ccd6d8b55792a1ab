"""What the executor writes on the FineTuneJob itself: the status fields that changed (one merge
patch, never ``progress`` unless the trainer's report rides along), an Event when the phase moves
or a problem appears, and the status of a job that failed before anything was made (a rejection,
a missing reference)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from kubetune.api.contract import (
    MANAGED_BY,
    ConditionType,
    Reason,
)
from kubetune.api.models import API_VERSION, KIND
from kubetune.api.timestamps import rfc3339
from kubetune.operator import metrics
from kubetune.operator.controller import (
    EVENT_THREADS,
    LOGGER,
    SETTINGS,
    Controller,
    identity,
    job_logger,
    kube,
    now,
)
from kubetune.operator.errors import api_errors
from kubetune.operator.kube import collection_path, finetunejob_path
from kubetune.operator.objects import Ftj, Key, Obj
from kubetune.operator.status import Rejection, rejected_status, set_condition, transition


def write_status(ctl: Controller, key: Key, ftj: Ftj, changes: Obj) -> None:
    """Merge-patch only ``changes`` (never progress); post an Event when the phase moves."""
    namespace, name = key
    old = ftj.get("status") or {}
    with api_errors(f"patching the status of {namespace}/{name}"):
        # The answer (the whole FineTuneJob) is not read: the watch brings the same object.
        path = finetunejob_path(namespace, name, "status")
        kube().merge_patch(path, {"status": changes}, read_answer=False)
    assert ctl.written is not None
    # Progress is not in the index (nor read by a plan): only the operator's own fields.
    owned = {k: v for k, v in changes.items() if k != "progress"}
    if owned:
        ctl.written[key] = {**ctl.written.get(key, {}), **owned}
    new = {**old, **changes}
    change = transition(old, new)
    if change is not None:
        kind, reason, message = change
        if old.get("phase") != new.get("phase"):
            metrics.TRANSITIONS.labels(str(old.get("phase") or "New"), str(new["phase"])).inc()
        post_event(ftj, kind, reason, message)
        job_logger(key).info("%s: %s", reason, message)


def post_event(ftj: Ftj, kind: str, reason: str, message: str) -> None:
    """A core/v1 Event on the FineTuneJob (best effort: a lost Event never fails a reconcile)."""
    metadata = ftj["metadata"]
    moment = now()
    stamp = rfc3339(moment)
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "generateName": f"{metadata['name'][:200]}.",
            "namespace": metadata["namespace"],
        },
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata.get("uid"),
        },
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": MANAGED_BY},
        "reportingComponent": MANAGED_BY,
        "reportingInstance": identity()[:128],
        "action": "Reconcile",
        # To the microsecond: a job's Events of one second (a tiny job's Running and
        # Succeeded) keep their order for readers (the OpenAI-compatible API, the console).
        "eventTime": rfc3339(moment, micros=True),
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    # Off the reconcile's path, so the POSTs may land out of order: the times say the order.
    _EVENTS.submit(_post, event)


#: Posts Events in the background.
_EVENTS = ThreadPoolExecutor(EVENT_THREADS, thread_name_prefix="event")


def _post(event: Obj) -> None:
    namespace = event["metadata"]["namespace"]
    try:
        path = collection_path("v1", "Event", namespace)
        kube().request("POST", path, body=event, read_answer=False)
    except Exception as exc:  # an Event is best effort
        name = event["involvedObject"]["name"]
        LOGGER.warning("posting the event %s on %s: %s", event["reason"], name, exc)


def reject(ctl: Controller, key: Key, ftj: Ftj, rejection: Rejection) -> None:
    """Fail the FineTuneJob for a problem no retry can fix (no children are made)."""
    status = rejected_status(ftj, rejection, now())
    write_status(ctl, key, ftj, status)
    job_logger(key).warning("%s: %s", rejection.reason, rejection.message)


def missing_reference(ctl: Controller, key: Key, ftj: Ftj, missing: list[str]) -> None:

    message = "; ".join(missing) + f" (checked again every {SETTINGS.reference_recheck_seconds:g}s)"
    status = ftj.get("status") or {}
    conditions_now = status.get("conditions") or []
    ready: Obj = next((c for c in conditions_now if c.get("type") == ConditionType.READY), {})
    if ready.get("message") == message:
        return
    generation = ftj["metadata"].get("generation")
    conditions = set_condition(
        status.get("conditions") or [],
        ConditionType.READY,
        False,
        reason=Reason.MISSING_REFERENCE,
        message=message,
        now=now(),
        generation=generation,
    )
    write_status(
        ctl,
        key,
        ftj,
        {"phase": "Pending", "observedGeneration": generation, "conditions": conditions},
    )
