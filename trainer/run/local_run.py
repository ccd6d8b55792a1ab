"""``kubetune train JOB.yaml [--output DIR]``: a FineTuneJob run on this machine, no cluster.

The manifest goes through the same defaulting as in the cluster (``load_finetunejob``) and the
same trainer; only the progress goes to a progress bar instead of the job's status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kubetune.api.contract import (
    MLFLOW_PASSWORD_ENV,
    MLFLOW_TOKEN_ENV,
    MLFLOW_USERNAME_ENV,
    TERMINATION_LOG_ENV,
    ExitCode,
)
from kubetune.api.errors import SpecError
from kubetune.api.models import KIND, FineTuneJobSpec

log = logging.getLogger("kubetune.trainer")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run a FineTuneJob manifest locally (CPU or local GPU)",
        description=(
            "Train a FineTuneJob manifest on this machine with the same defaults and trainer as "
            "in the cluster. Writes the adapter, result.json, metrics.jsonl and loss_curve.png "
            "to the output location."
        ),
    )
    parser.add_argument("manifest", type=Path, help="FineTuneJob YAML file")
    parser.add_argument(
        "--output", type=Path, help="write the adapter here instead of spec.output.uri"
    )
    parser.add_argument("--no-progress", action="store_true", help="log lines, no progress bar")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow spec.model.trustRemoteCode: run code shipped with the model on this machine",
    )
    parser.add_argument(
        "--push",
        action="store_true",
        help="allow spec.output.pushToHub: push the adapter with this machine's hub credentials",
    )
    parser.set_defaults(func=train_command)


#: The MLflow credentials a shell may hold (the names MLflow's client reads).
_MLFLOW_CREDENTIALS = (MLFLOW_USERNAME_ENV, MLFLOW_PASSWORD_ENV, MLFLOW_TOKEN_ENV)


def local_policy_problems(
    spec: FineTuneJobSpec, *, trust_remote_code: bool, push: bool
) -> list[str]:
    """What a manifest asks of this machine that needs the user's say-so: a manifest from
    elsewhere is input, as a FineTuneJob is to the operator."""
    problems = []
    if spec.model.trust_remote_code and not trust_remote_code:
        problems.append(
            "spec.model.trustRemoteCode: runs code shipped with the model on this machine; "
            "pass --trust-remote-code to allow it"
        )
    if spec.output.push_to_hub is not None and not push:
        problems.append(
            "spec.output.pushToHub: pushes with this machine's hub credentials; pass --push to "
            "allow it"
        )
    return problems


def ambient_credentials_to_drop(spec: FineTuneJobSpec, environ: Mapping[str, str]) -> list[str]:
    """The shell's MLflow credentials that must not reach the manifest's tracking server: all of
    them, unless the manifest tracks to the shell's own MLFLOW_TRACKING_URI."""
    mlflow = spec.tracking.mlflow if spec.tracking is not None else None
    shell_uri = environ.get("MLFLOW_TRACKING_URI", "").rstrip("/")
    if mlflow is not None and shell_uri and mlflow.tracking_uri.rstrip("/") == shell_uri:
        return []
    return [name for name in _MLFLOW_CREDENTIALS if name in environ]


def train_command(args: argparse.Namespace) -> int:
    from kubetune.api.config import TrainerConfig
    from kubetune.api.manifest import load_finetunejob
    from kubetune.trainer.publish.outputs import RESULT_FILE
    from kubetune.trainer.run.runner import RunOutcome, configure_logging, run

    configure_logging()
    try:
        job = load_finetunejob(_with_output(args.manifest, args.output))
    except SpecError as exc:
        print(f"error: {args.manifest} is not a valid FineTuneJob:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return int(ExitCode.INVALID_CONFIG)
    problems = local_policy_problems(
        job.spec, trust_remote_code=args.trust_remote_code, push=args.push
    )
    if problems:
        print(
            f"error: {args.manifest} asks for what this command needs a flag for:", file=sys.stderr
        )
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return int(ExitCode.INVALID_CONFIG)
    for name in ambient_credentials_to_drop(job.spec, os.environ):
        # The manifest names its own tracking server: the shell's credentials are for another.
        del os.environ[name]
    config = TrainerConfig(spec=job.spec)
    write_termination = TERMINATION_LOG_ENV in os.environ
    if job.spec.resources.world_size > 1:
        # Several ranks on this machine (resources.gpus > 1), through the pod's own launcher.
        from kubetune.api.uris import CHECKPOINT_SCHEMES, OUTPUT_SCHEMES
        from kubetune.trainer.locations import resolve
        from kubetune.trainer.run.launcher import launch

        extra = ["--name", job.name] + ([] if args.no_progress else ["--progress-bar"])
        code, result = launch(config, None, extra, write_termination=write_termination)
        schemes = CHECKPOINT_SCHEMES if job.spec.output.is_oci else OUTPUT_SCHEMES
        where = resolve(job.spec.output.working_uri, schemes, "output")
        outcome = RunOutcome(code, result, str(where.path) if where.is_local else None)
    else:
        outcome = run(
            config,
            name=job.name,
            progress_bar=not args.no_progress,
            write_termination=write_termination,
        )
    adapter = outcome.result.adapter
    if adapter is not None:
        # Also when a step after saving failed: the adapter is there, and the result says so.
        print(f"adapter: {outcome.output_dir}")
        print(f"sha256:  {adapter.sha256} ({adapter.size_bytes} bytes)")
        print(f"result:  {Path(outcome.output_dir or '.') / RESULT_FILE}")
    if outcome.exit_code != ExitCode.SUCCEEDED:
        print(f"error ({outcome.result.reason}): {outcome.result.message}", file=sys.stderr)
    return outcome.exit_code


def _with_output(manifest: Path, output: Path | None) -> Path | dict[str, Any]:
    """The manifest, with ``--output`` as its ``spec.output.uri`` (which it then needn't have).

    Anything unreadable goes to ``load_finetunejob`` as the path, which names the problem."""
    if output is None:
        return manifest
    from kubetune.api.documents import DocumentTooLarge, load_yaml_documents

    try:
        documents = load_yaml_documents(manifest.read_text(), str(manifest))
    except (OSError, ValueError, DocumentTooLarge, yaml.YAMLError):
        return manifest
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(jobs) != 1 or not isinstance(jobs[0].get("spec"), dict):
        return manifest
    job = dict(jobs[0])
    spec = dict(job["spec"])
    current = spec.get("output")
    # A folder instead of a registry: the oci:// output's own fields go with it.
    kept = {
        k: v
        for k, v in (current if isinstance(current, dict) else {}).items()
        if k not in ("checkpointUri", "registry")
    }
    spec["output"] = {**kept, "uri": str(output.resolve())}
    job["spec"] = spec
    return job


def main(argv: list[str] | None = None) -> int:
    """Stand-alone ``kubetune train`` for before the main CLI wires it in."""
    parser = argparse.ArgumentParser(prog="kubetune")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
