"""``kubetune serve-manifest NAME --for vllm|kserve|kaito``: print a ready manifest that serves a
finished FineTuneJob's adapter on its base model (api/serving.py builds it; docs/serving.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from kubetune.api.contract import ExitCode
from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.api.serving import STACKS, NotServable, render
from kubetune.cli.watch import connect, job_arguments


def serve_manifest(
    name: str, namespace: str, kubeconfig: str | None, stack: str, *, image: str | None = None
) -> int:
    from kubernetes import client

    custom, _ = connect(kubeconfig)
    try:
        job: dict[str, Any] = custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
    except client.ApiException as exc:
        if exc.status == 404:
            print(f"FineTuneJob {namespace}/{name} not found", file=sys.stderr)
            return 1
        raise
    try:
        objects = render(job, stack, image=image)  # type: ignore[arg-type]
    except NotServable as exc:
        print(f"kubetune serve-manifest: {exc}", file=sys.stderr)
        return int(ExitCode.INVALID_CONFIG)
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


def _run(args: argparse.Namespace) -> int:
    return serve_manifest(args.name, args.namespace, args.kubeconfig, args.stack, image=args.image)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve-manifest",
        parents=[job_arguments()],
        help="print a manifest that serves a finished job's adapter (vLLM, KServe, KAITO)",
        description=(
            "Reads the FineTuneJob's status.result and prints the objects that load its adapter "
            "on its base: a vLLM Deployment and Service (--enable-lora --lora-modules), a KServe "
            "LLMInferenceService (spec.model.lora.adapters) or a KAITO Workspace "
            "(inference.adapters). Pipe it to kubectl apply -f -."
        ),
    )
    parser.add_argument("--for", dest="stack", choices=STACKS, required=True)
    parser.add_argument("--image", help="the vLLM image (default: a pinned vllm/vllm-openai)")
    parser.set_defaults(func=_run)
