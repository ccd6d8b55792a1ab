"""``kubetune-trainer --config FILE``: the entry point of every trainer pod."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import platform
import sys
from pathlib import Path

from kubetune.api.contract import PREFLIGHT_SUBCOMMAND, ExitCode
from kubetune.api.errors import ConfigError
from kubetune.trainer.publish import outputs
from kubetune.trainer.run.runner import configure_logging, failure, preflight, run

log = logging.getLogger("kubetune.trainer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune-trainer",
        description=(
            "Run one QLoRA SFT training from a resolved trainer config (the ConfigMap the "
            "kubetune operator writes). Exit codes: 0 succeeded, 2 invalid config, 3 dataset "
            "unusable, 4 model unusable, 5 out of GPU memory, 6 diverged (NaN or inf loss), "
            "143 preempted (a checkpoint was saved), 1 unexpected. "
            f"'kubetune-trainer {PREFLIGHT_SUBCOMMAND} --config FILE' checks and estimates "
            "the run without loading the model."
        ),
    )
    parser.add_argument("--config", required=True, help="path of the TrainerConfig YAML")
    parser.add_argument(
        "--progress-bar", action="store_true", help="show a progress bar instead of log lines"
    )
    parser.add_argument(
        "--name", help="the adapter's name in its model card (default: the config's job name)"
    )
    return parser


def runtime_description() -> str:
    """kubetune's version and the Python environment this runs from, with the image's own
    version file (``IMAGE-VERSION``, which the Dockerfile writes beside the environment) when
    there is one: the first line of every trainer pod's log."""
    text = (
        f"kubetune-trainer {importlib.metadata.version('kubetune')}, "
        f"Python {platform.python_version()} in {sys.prefix}"
    )
    image_version = Path(sys.prefix, "IMAGE-VERSION")
    if image_version.is_file():
        text += f", image {image_version.read_text().strip()}"
    return text


def build_preflight_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"kubetune-trainer {PREFLIGHT_SUBCOMMAND}",
        description=(
            "Check a run before it asks for a GPU: read, check and tokenize the dataset (a "
            "sample, extrapolated, for very large ones), count examples, tokens and optimizer "
            "steps as the run will, read the model's config and tokenizer (not its weights), "
            "plan memory for spec.validation.gpuKind and estimate the seconds. The estimate, "
            "or the failure the run would end in, is the termination message; the exit codes "
            "are the run's."
        ),
    )
    parser.add_argument("--config", required=True, help="path of the TrainerConfig YAML")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    checking = bool(argv) and argv[0] == PREFLIGHT_SUBCOMMAND
    if checking:
        args = build_preflight_parser().parse_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    configure_logging()
    log.info("%s", runtime_description())
    from kubetune.api.config import load_trainer_config

    try:
        config = load_trainer_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        outputs.write_termination_message(failure(ExitCode.INVALID_CONFIG, str(exc)))
        return int(ExitCode.INVALID_CONFIG)
    if checking:
        return preflight(config).exit_code
    name = args.name or (config.job.name if config.job else "adapter")
    from kubetune.trainer.run import distributed, launcher

    rank = distributed.this_rank()
    if rank.outcomes is not None:
        # One rank of a group this pod's launcher started: its outcome goes to the launcher.
        return launcher.run_rank(rank, config, name=name)
    if config.spec.resources.world_size > 1:
        extra = ["--name", name] + (["--progress-bar"] if args.progress_bar else [])
        return launcher.launch(config, args.config, extra)[0]
    return run(config, name=name, progress_bar=args.progress_bar).exit_code


if __name__ == "__main__":
    raise SystemExit(main())
