"""``kubetune-operator``: run the kopf operator with kubetune's handlers and settings."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import Final

import kopf
from pydantic import ValidationError

from kubetune.operator.settings import OperatorSettings

#: The cyclic collector's thresholds (Python's own: 700, 10, 10). Every watch event and pass
#: allocates a few thousand objects that live a moment (parsed bodies, kopf's causes and
#: loggers, plans); at 700 the youngest generation was collected several times per job, each
#: collection promoting whatever was alive at that instant, and the older generations grew and
#: were walked with it: 0.5 ms of CPU per job in collections, 0.2 after (docs/performance.md).
GC_THRESHOLDS: Final = (10_000, 20, 20)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kubetune-operator",
        description=(
            "Run the kubetune operator: FineTuneJobs in, trainer Jobs out. Configured by "
            "KUBETUNE_* environment variables (see docs/operator.md); credentials come from the "
            "pod's service account or from KUBECONFIG."
        ),
    )
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; overrides KUBETUNE_NAMESPACES)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.namespace:
        # One source of truth for the handlers, which read the settings when imported.
        os.environ["KUBETUNE_NAMESPACES"] = ",".join(args.namespace)
    try:
        settings = OperatorSettings()
    except ValidationError as exc:
        sys.exit(f"kubetune-operator: invalid settings:\n{exc}")
    namespaces = settings.namespaces
    from kubetune.operator.informer import check_namespaces

    try:
        check_namespaces(namespaces)
    except ValueError as exc:
        sys.exit(f"kubetune-operator: invalid settings: {exc}")
    kopf.configure(
        verbose=settings.verbose,
        log_format=kopf.LogFormat.JSON if settings.json_logs else kopf.LogFormat.FULL,
        # Every line about a FineTuneJob names it: under "k8s" in JSON, as a [ns/name] prefix
        # in text.
        log_prefix=not settings.json_logs,
        log_refkey="k8s" if settings.json_logs else None,
    )
    if not settings.verbose:
        # kopf logs every handled event ("Handler ... succeeded"): thousands a minute at scale.
        # The operator's own lines say what happened; kopf's warnings and errors stay.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Importing the handlers registers them with kopf's default registry.
    from kubernetes.config import ConfigException

    from kubetune.operator import handlers  # noqa: F401
    from kubetune.operator.controller import kube

    try:
        kube()
    except ConfigException as exc:
        sys.exit(f"kubetune-operator: no Kubernetes credentials (in-cluster or KUBECONFIG): {exc}")

    tune_gc()
    kopf.run(
        # Replicas elect the active one through a Lease (handlers.py), not kopf's peering.
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=settings.liveness_endpoint,
    )


def tune_gc() -> None:
    """Once everything is imported and configured: what exists now (modules, classes, the
    settings, the API client) is never walked by the cyclic collector again (``gc.freeze``),
    and the youngest generation is collected every ``GC_THRESHOLDS[0]`` allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


if __name__ == "__main__":
    main()
