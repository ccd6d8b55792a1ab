"""``kubetune logs NAME``: the trainer's log, across attempts.

A FineTuneJob's trainer may run in several pods over its life (a retry, an eviction that
resumes from a checkpoint). This follows whichever pod ``status.podName`` names (during the
Validating phase, the validation pod), announces each new attempt, and stops when the job has
finished and its last pod's log is read to the end.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubetune.api.contract import (
    COMPONENT_LABEL,
    FINETUNEJOB_ANNOTATION,
    TRAINER_CONTAINER,
    VALIDATOR_COMPONENT,
)
from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.cli.watch import connect, job_arguments

_TERMINAL = {"Succeeded", "Failed"}


def _status(custom: Any, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes import client

    try:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    status: dict[str, Any] = obj.get("status") or {}
    return status


def _validation_pod(core: Any, namespace: str, name: str) -> str | None:
    """The newest pod of the Validating phase of ``name`` (``status.podName`` names trainers)."""
    selector = f"{COMPONENT_LABEL}={VALIDATOR_COMPONENT}"
    pods = [
        pod
        for pod in core.list_namespaced_pod(namespace, label_selector=selector).items
        if (pod.metadata.annotations or {}).get(FINETUNEJOB_ANNOTATION) == name
    ]
    if not pods:
        return None
    newest = max(pods, key=lambda pod: pod.metadata.creation_timestamp)
    return str(newest.metadata.name)


def _lines(core: Any, namespace: str, pod: str, follow: bool) -> Iterator[str]:
    """The pod's trainer log, line by line; ends when the container does (or at once when the
    pod has no log yet)."""
    from kubernetes import client

    try:
        response = core.read_namespaced_pod_log(
            pod, namespace, container=TRAINER_CONTAINER, follow=follow, _preload_content=False
        )
    except client.ApiException as exc:
        if exc.status in (400, 404):  # not started yet, or already gone
            return
        raise
    pending = b""
    for chunk in response.stream(1024):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode(errors="replace")
    if pending:
        yield pending.decode(errors="replace")


def _print_line(line: str) -> None:
    print(line, flush=True)  # line by line, also into a pipe


def follow_logs(
    name: str,
    namespace: str,
    kubeconfig: str | None,
    *,
    follow: bool = True,
    interval: float = 2.0,
    out: Callable[[str], None] = _print_line,
) -> int:
    """Print the trainer's log; 0 when the job succeeded, 1 when it failed or isn't there."""
    custom, core = connect(kubeconfig)
    shown: str | None = None  # the pod whose log has been printed to its end
    announced: str | None = None
    while True:
        status = _status(custom, namespace, name)
        if status is None:
            out(f"FineTuneJob {namespace}/{name} not found")
            return 1
        pod = status.get("podName")
        validating = not pod and status.get("phase") == "Validating"
        if validating:
            pod = _validation_pod(core, namespace, name)
        finished = status.get("phase") in _TERMINAL
        if pod and pod != shown:
            if pod != announced:
                attempt = status.get("attempts")
                suffix = f" (attempt {attempt})" if attempt else ""
                what = "validation pod" if validating else "pod"
                out(f"--- {name}: {what} {pod}{suffix} ---")
                announced = pod
            printed = False
            for line in _lines(core, namespace, pod, follow and not finished):
                out(line)
                printed = True
            if printed or finished or not follow:
                shown = pod
                continue  # look again at once: a newer attempt may have started
        elif finished or not follow:
            if not pod:
                out(f"{name} has no trainer pod yet ({status.get('phase') or 'Pending'})")
            return 1 if status.get("phase") == "Failed" else 0
        time.sleep(interval)


def _run(args: argparse.Namespace) -> int:
    return follow_logs(args.name, args.namespace, args.kubeconfig, follow=args.follow)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "logs",
        parents=[job_arguments()],
        help="the trainer's log of one FineTuneJob, following it across attempts",
    )
    parser.add_argument(
        "-f", "--follow", action="store_true", help="keep following until the job finishes"
    )
    parser.set_defaults(func=_run)
