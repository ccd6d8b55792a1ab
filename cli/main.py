"""The ``kubetune`` command: one entry point, one sub-command per capability."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from kubetune.api.contract import ExitCode
from kubetune.api.errors import SpecError

# Sub-commands that live with their capability; each module exposes register(subparsers).
# They are imported at start-up, so none may import torch or the kubernetes client at top level.
_PLUGINS = {
    "train": ("kubetune.trainer.run.local_run", "trainer"),
    "local": ("kubetune.local.cli", "operator"),
    "watch": ("kubetune.cli.watch", "operator"),
    "logs": ("kubetune.cli.logs", "operator"),
    "serve-manifest": ("kubetune.cli.serve_manifest", "operator"),
    "ui": ("kubetune.cli.ui", "server"),
}


def _validate(args: argparse.Namespace) -> int:
    from kubetune.api.manifest import load_finetunejob

    status = int(ExitCode.SUCCEEDED)
    for path in args.manifests:
        try:
            job = load_finetunejob(path)
        except SpecError as exc:
            print(f"{path}: invalid", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
            status = int(ExitCode.INVALID_CONFIG)
        else:
            print(f"{path}: FineTuneJob {job.name} is valid")
    return status


def _crd(args: argparse.Namespace) -> int:
    from kubetune.api.crd import render_crd, write_crd
    from kubetune.api.reference import render_reference

    if args.reference:
        Path(args.reference).write_text(render_reference())
        print(f"wrote {args.reference}")
    if args.write:
        print(f"wrote {write_crd(args.write)}")
    else:
        sys.stdout.write(render_crd())
    return 0


def _missing_extra(extra: str, error: ImportError) -> argparse.Namespace:
    def run(_: argparse.Namespace) -> int:
        print(
            f"this command needs the '{extra}' extra: pip install 'kubetune[{extra}]' ({error})",
            file=sys.stderr,
        )
        return int(ExitCode.INVALID_CONFIG)

    return argparse.Namespace(func=run)


def build_parser(prog: str = "kubetune") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Kubernetes-native QLoRA fine-tuning. See README.md for a first run.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = subparsers.add_parser("validate", help="check FineTuneJob manifests offline")
    validate.add_argument("manifests", nargs="+", metavar="JOB.yaml")
    validate.set_defaults(func=_validate)

    crd = subparsers.add_parser("crd", help="print (or --write DIR) the FineTuneJob CRD")
    crd.add_argument("--write", metavar="DIR", nargs="?", const="crds")
    crd.add_argument("--reference", metavar="FILE", help="also write the field reference")
    crd.set_defaults(func=_crd)

    for name, (module_name, extra) in _PLUGINS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            stub = subparsers.add_parser(name, help=f"(needs kubetune[{extra}])")
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(func=_missing_extra(extra, exc).func)
        else:
            module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Installed as kubectl-kubetune too, kubectl runs it as a plugin: `kubectl kubetune ...`.
    plugin = Path(sys.argv[0]).name == "kubectl-kubetune"
    args = build_parser("kubectl kubetune" if plugin else "kubetune").parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
