"""One run from start to exit code: failures become a named reason, a message and an exit code,
and every outcome becomes the termination message the operator reads."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from kubetune.api.config import TrainerConfig
from kubetune.api.contract import EXIT_CODE_REASONS, ExitCode
from kubetune.api.models import TrainerResult
from kubetune.trainer import outputs
from kubetune.trainer.errors import InvalidConfig, TrainerFailure
from kubetune.trainer.progress import ProgressReporter
from kubetune.trainer.secrets import (
    PUSH_TOKEN_ENV,
    install_redaction,
    redact,
    uninstall_redaction,
)

log = logging.getLogger("kubetune.trainer")

#: A preempted run exits as SIGTERM would have it (128 + 15): retried, and it resumes.
PREEMPTED_EXIT_CODE = 143


@dataclass(frozen=True)
class RunOutcome:
    exit_code: int
    result: TrainerResult
    output_dir: str | None = None


def configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def _route_library_logs_through_root() -> None:
    # transformers and datasets print through handlers of their own; sending their records to the
    # root logger puts them behind the same secret redaction as ours.
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    datasets_logger = logging.getLogger("datasets")
    for handler in list(datasets_logger.handlers):
        datasets_logger.removeHandler(handler)
    datasets_logger.propagate = True


def failure(reason: str, message: str) -> TrainerResult:
    return TrainerResult(outcome="Failed", reason=reason, message=message)


def run(
    config: TrainerConfig,
    *,
    name: str = "adapter",
    progress_bar: bool = False,
    reporter: ProgressReporter | None = None,
    write_termination: bool = True,
) -> RunOutcome:
    """Train, save, and say how it went. Never raises for a failure it can name.

    ``write_termination`` is off for laptop runs that named no termination-log path: there is
    no kubelet to read it, and /dev is no place to leave files.
    """
    from kubetune.trainer.secrets import resolve_hub_token

    secrets: list[str] = []
    try:
        token = resolve_hub_token(config.token_file)
        secrets = [token] if token else []
    except InvalidConfig:
        pass  # the recipe reports it below, with its exit code
    push_token = os.environ.get(PUSH_TOKEN_ENV)
    if push_token:
        secrets.append(push_token)
    guard = install_redaction(secrets)
    try:
        outcome = _run(config, name, progress_bar, reporter)
    finally:
        uninstall_redaction(guard)
    if secrets:
        outcome = RunOutcome(
            outcome.exit_code,
            outcome.result.model_copy(update={"message": redact(outcome.result.message, secrets)}),
            outcome.output_dir,
        )
    if write_termination:
        outputs.write_termination_message(outcome.result)
    return outcome


def _run(
    config: TrainerConfig, name: str, progress_bar: bool, reporter: ProgressReporter | None
) -> RunOutcome:
    from kubetune.trainer.recipe import QLoRASFTRecipe

    try:
        recipe = QLoRASFTRecipe(config, name=name, progress_bar=progress_bar, reporter=reporter)
        _route_library_logs_through_root()
        recipe.setup()
        trained = recipe.train()
        if trained.preempted:
            message = (
                f"stopped by SIGTERM at step {trained.global_step}; the checkpoint under "
                f"{config.spec.output.uri}/checkpoints lets the next attempt resume"
            )
            log.warning(message)
            return RunOutcome(PREEMPTED_EXIT_CODE, failure("Preempted", message))
        result = recipe.save(trained)
    except TrainerFailure as exc:
        log.error("%s: %s", exc.reason, exc.message)
        return RunOutcome(int(exc.exit_code), failure(exc.reason, exc.message))
    except Exception as exc:
        if _is_out_of_memory(exc):
            message = f"out of GPU memory: {exc}"[:1000]
            log.error(message)
            reason = EXIT_CODE_REASONS[ExitCode.OUT_OF_MEMORY]
            return RunOutcome(int(ExitCode.OUT_OF_MEMORY), failure(reason, message))
        log.exception("training failed unexpectedly")
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        message = f"{type(exc).__name__}: {first_line}"[:1000]
        return RunOutcome(
            int(ExitCode.UNEXPECTED), failure(EXIT_CODE_REASONS[ExitCode.UNEXPECTED], message)
        )
    log.info(
        "adapter: %s (sha256 %s)", config.spec.output.uri, result.adapter and result.adapter.sha256
    )
    return RunOutcome(int(ExitCode.SUCCEEDED), result, str(recipe.output_dir))


def _is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)
