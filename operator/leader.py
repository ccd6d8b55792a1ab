"""Leader election on a coordination.k8s.io Lease: of the operator's replicas, one acts.

Every replica watches and keeps its caches warm; only the holder of the Lease reconciles. The
holder renews the Lease every ``renew_seconds``, on a thread of its own with an API connection of
its own (``LeaseKeeper``), so a backlog of reconciles or a busy event loop never delays it; a
Lease not renewed for its ``leaseDurationSeconds`` (by the holder's clock, or by ours since we
last saw it change) is taken over. Taking over is an optimistic-concurrency write (the
resourceVersion we read), so two replicas never both win the same term. A replica that stops
cleanly gives the Lease up at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetune.api.timestamps import parse_rfc3339, rfc3339
from kubetune.operator.kube import Kube


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return parse_rfc3339(str(value))
    except ValueError:
        return None


@dataclass(eq=False)
class LeaseLock:
    """The Lease ``namespace/name``, as replica ``identity`` tries to hold it."""

    kube: Kube
    namespace: str
    name: str
    identity: str
    #: Seconds: the Lease's leaseDurationSeconds as this replica writes it.
    duration: int
    #: The Lease as this replica last wrote it; None while another holds it.
    _lease: dict[str, Any] | None = field(default=None, init=False)
    #: (resourceVersion, when we first saw it).
    _seen: tuple[str, float] | None = field(default=None, init=False)

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    def _spec(self, previous: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
        previous = previous or {}
        ours = previous.get("holderIdentity") == self.identity
        transitions = int(previous.get("leaseTransitions") or 0)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "acquireTime": previous.get("acquireTime") if ours else rfc3339(now, micros=True),
            "renewTime": rfc3339(now, micros=True),
            "leaseTransitions": transitions if ours or not previous else transitions + 1,
        }

    def _expired(self, lease: dict[str, Any], now: datetime) -> bool:
        spec = lease.get("spec") or {}
        if not spec.get("holderIdentity"):
            return True
        duration = int(spec.get("leaseDurationSeconds") or self.duration)
        version = str(lease["metadata"]["resourceVersion"])
        if self._seen is None or self._seen[0] != version:
            self._seen = (version, time.monotonic())
        renewed = _parse(spec.get("renewTime"))
        by_holder = renewed is None or now - renewed > timedelta(seconds=duration)
        by_us = time.monotonic() - self._seen[1] > duration
        return by_holder or by_us

    def try_acquire_or_renew(self) -> bool:
        """True while this replica holds the Lease (blocking; API failures raise)."""
        now = datetime.now(UTC)
        # Renew without reading first: the resourceVersion we wrote last must still be it.
        if self._lease is not None and self._held(self._lease) and self._write(self._lease, now):
            return True
        lease = self.kube.get_or_none(self.path)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(None, now),
            }
            try:
                self._lease = self.kube.request("POST", self.path.rsplit("/", 1)[0], body=body)
            except ApiException as exc:
                if exc.status == 409:
                    return False
                raise
            return True
        if self._held(lease) or self._expired(lease, now):
            return self._write(lease, now)
        self._lease = None
        return False

    def _held(self, lease: dict[str, Any]) -> bool:
        return bool((lease.get("spec") or {}).get("holderIdentity") == self.identity)

    def _write(self, lease: dict[str, Any], now: datetime) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease["metadata"]["resourceVersion"],
            },
            "spec": self._spec(lease.get("spec"), now),
        }
        try:
            self._lease = self.kube.request("PUT", self.path, body=body)
        except ApiException as exc:
            if exc.status == 409:
                self._lease = None
                return False
            raise
        return True

    def release(self) -> None:
        """Give the Lease up (a clean stop), so another replica takes over at once."""
        if self._lease is None or not self._held(self._lease):
            return
        spec = dict(self._lease.get("spec") or {})
        spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=rfc3339(micros=True))
        body = {**self._lease, "spec": spec}
        with contextlib.suppress(ApiException):  # else it expires on its own
            self.kube.request("PUT", self.path, body=body)
        self._lease = None


class LeaseKeeper(threading.Thread):
    """Holds (or waits for) the Lease on a thread of its own: every ``renew_seconds`` it tries to
    acquire or renew, and calls ``on_change(held)`` when this replica becomes, or stops being,
    the leader. A leader that can't reach the API steps down once 80% of the Lease's duration
    has passed since its last renewal, before anyone may take over."""

    def __init__(
        self,
        lock: LeaseLock,
        renew_seconds: float,
        on_change: Callable[[bool], None],
        log: logging.Logger,
    ) -> None:
        super().__init__(name="lease", daemon=True)
        self.lock = lock
        self.renew_seconds = renew_seconds
        self.on_change = on_change
        self.log = log
        self.held = False
        self._renewed = time.monotonic()
        self._stopping = threading.Event()

    def step(self) -> bool:
        """One try; whether this replica holds the Lease now (``on_change`` on a change)."""
        try:
            held = self.lock.try_acquire_or_renew()
            if held:
                self._renewed = time.monotonic()
        except Exception as exc:  # the API is down: keep trying
            self.log.warning("Lease %s: %s", self.lock.name, exc)
            held = self.held and time.monotonic() - self._renewed < self.lock.duration * 0.8
        if held != self.held:
            self.held = held
            self.on_change(held)
        return held

    def run(self) -> None:
        while not self._stopping.is_set():
            self.step()
            self._stopping.wait(self.renew_seconds)

    def stop(self) -> None:
        """Stop renewing; give the Lease up if this replica holds it (a clean stop)."""
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=self.lock.duration)
        if self.held:
            self.held = False
            self.lock.release()
