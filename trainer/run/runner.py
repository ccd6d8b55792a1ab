"""One run from start to exit code: failures become a named reason, a message and an exit code,
and every outcome becomes the termination message the operator reads."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kubetune.api.config import TrainerConfig
from kubetune.api.contract import EXIT_CODE_REASONS, ExitCode, Reason
from kubetune.api.models import TrainerResult
from kubetune.api.uris import display_uri
from kubetune.trainer.errors import TrainerFailure, first_line
from kubetune.trainer.publish import outputs
from kubetune.trainer.publish.registry_client import registry_secrets
from kubetune.trainer.run.distributed import Rank, share_from_main
from kubetune.trainer.run.progress import ProgressReporter
from kubetune.trainer.run.tracking import tracking_secrets
from kubetune.trainer.secrets import (
    HubTokens,
    install_redaction,
    object_store_secrets,
    redact_result,
    resolve_hub_tokens,
    uninstall_redaction,
)

if TYPE_CHECKING:
    from kubetune.trainer.publish.publishing import Publication

log = logging.getLogger("kubetune.trainer")


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


def failure(code: ExitCode, message: str) -> TrainerResult:
    return TrainerResult(outcome="Failed", reason=EXIT_CODE_REASONS[code], message=message)


def run(
    config: TrainerConfig,
    *,
    name: str = "adapter",
    progress_bar: bool = False,
    reporter: ProgressReporter | None = None,
    write_termination: bool = True,
    rank: Rank | None = None,
) -> RunOutcome:
    """Train, save, and say how it went. Never raises for a failure it can name.

    ``write_termination`` is off for laptop runs that named no termination-log path: there is
    no kubelet to read it, and /dev is no place to leave files, and for the ranks of a group
    (their launcher writes it). ``rank`` is this process's place in a group of ranks.
    """
    rank = rank or Rank()
    return _guarded(
        config,
        lambda tokens: _run(config, tokens, name, progress_bar, reporter, rank=rank),
        write_termination,
    )


def preflight(config: TrainerConfig, *, write_termination: bool = True) -> RunOutcome:
    """``kubetune-trainer preflight``: check the data and estimate the run (no weights loaded);
    the estimate, or the failure the run would end in, goes to the termination message."""
    return _guarded(config, lambda tokens: _preflight(config, tokens), write_termination)


def _guarded(
    config: TrainerConfig, body: Callable[[HubTokens], RunOutcome], write_termination: bool
) -> RunOutcome:
    """``body`` with the run's tokens, behind secret redaction; its outcome as the result."""
    spec = config.spec
    try:
        tokens = (
            resolve_hub_tokens(config.token_file)
            .with_uri_credentials([uri for _, uri, _ in spec.uris()])
            .with_secrets(tracking_secrets())
            .with_secrets(object_store_secrets())
            .with_secrets(registry_secrets() if spec.output.is_oci else [])
            .with_secrets(_adapter_registry_secrets(config))
        )
    except TrainerFailure as exc:
        log.error("%s", exc.log_line())
        outcome = RunOutcome(int(exc.exit_code), failure(exc.exit_code, exc.message))
    else:
        guard = install_redaction(tokens.secrets)
        try:
            outcome = body(tokens)
        finally:
            uninstall_redaction(guard)
        # The last line of defence: whatever a failure quoted, no secret leaves in the result.
        result = redact_result(outcome.result, tokens.secrets)
        outcome = RunOutcome(outcome.exit_code, result, outcome.output_dir)
    if write_termination:
        outputs.write_termination_message(outcome.result)
    return outcome


def _adapter_registry_secrets(config: TrainerConfig) -> list[str]:
    """The login of an oci:// starting adapter's registry, never to be shown either."""
    adapter = config.spec.model.adapter
    if adapter is None or not adapter.uri.startswith("oci://"):
        return []
    from kubetune.trainer.model.starting_adapter import adapter_auth_file

    return registry_secrets(adapter_auth_file())


def _preflight(config: TrainerConfig, tokens: HubTokens) -> RunOutcome:
    from kubetune.trainer.plan import preflight as checks

    try:
        _route_library_logs_through_root()
        result = checks.preflight(config, tokens.read)
    except Exception as exc:
        return _failed(exc, "preflight")
    return RunOutcome(int(ExitCode.SUCCEEDED), result)


def _failed(exc: Exception, what: str, *, gpu: bool = False) -> RunOutcome:
    """The outcome of a run or a preflight ended by ``exc``: the failure it names, out of GPU
    memory (``gpu``: a run that may have used one), or an unexpected error (logged with its
    traceback)."""
    if isinstance(exc, TrainerFailure):
        log.error("%s", exc.log_line())
        result = TrainerResult(outcome="Failed", reason=exc.reason, message=exc.message)
        return RunOutcome(int(exc.exit_code), result)
    if gpu and _is_out_of_memory(exc):
        message = f"out of GPU memory: {exc}"[:1000]
        log.error(message)
        return RunOutcome(int(ExitCode.OUT_OF_MEMORY), failure(ExitCode.OUT_OF_MEMORY, message))
    log.exception("%s failed unexpectedly", what)
    message = f"{type(exc).__name__}: {first_line(exc, 1000)}"[:1000]
    return RunOutcome(int(ExitCode.UNEXPECTED), failure(ExitCode.UNEXPECTED, message))


def _published_outcome(published: Publication | None, rank: Rank, output_dir: Path) -> RunOutcome:
    """The outcome of a run that trained to its end: rank 0's publication, or on another rank
    a note that rank 0 publishes."""
    if published is None:  # a rank other than 0: rank 0 publishes, and says how it went
        waiting = TrainerResult(
            outcome="Succeeded",
            reason=Reason.SUCCEEDED,
            message=f"rank {rank.rank} trained; rank 0 publishes the adapter",
        )
        return RunOutcome(int(ExitCode.SUCCEEDED), waiting)
    result = published.result
    if published.exit_code != ExitCode.SUCCEEDED:
        log.error("%s: %s", result.reason, result.message)
    elif result.adapter is not None:
        log.info("adapter: %s (sha256 %s)", result.adapter.uri, result.adapter.sha256)
    return RunOutcome(int(published.exit_code), result, str(output_dir))


def _run(
    config: TrainerConfig,
    tokens: HubTokens,
    name: str,
    progress_bar: bool,
    reporter: ProgressReporter | None,
    *,
    rank: Rank,
) -> RunOutcome:
    from kubetune.trainer.run.recipe import QLoRASFTRecipe

    recipe: QLoRASFTRecipe | None = None
    publishing = False
    #: How the MLflow run (if any) ends: a preempted one is continued by the next attempt.
    tracked: Literal["FINISHED", "FAILED", "KILLED"] = "FAILED"
    try:
        recipe = QLoRASFTRecipe(
            config,
            tokens=tokens,
            name=name,
            progress_bar=progress_bar,
            reporter=reporter,
            rank=rank,
        )
        _route_library_logs_through_root()
        recipe.setup()
        trained = recipe.train()
        if trained.preempted:
            tracked = "KILLED"
            message = (
                f"stopped by SIGTERM at step {trained.global_step}; the checkpoint under "
                f"{display_uri(config.spec.output.working_uri)}/checkpoints lets the next attempt "
                "resume"
            )
            log.warning(message)
            return RunOutcome(int(ExitCode.PREEMPTED), failure(ExitCode.PREEMPTED, message))
        publishing = True
        published = recipe.save(trained)
        if published is not None and published.exit_code == ExitCode.SUCCEEDED:
            tracked = "FINISHED"
    except Exception as exc:
        outcome = _failed(exc, "training", gpu=True)
    else:
        outcome = _published_outcome(published, rank, recipe.output_dir)
    finally:
        if recipe is not None:
            recipe.end_tracking(tracked)
            # The final progress reaches the operator before the pod ends (or a minute passes).
            recipe.reporter.close()
    if recipe is not None and recipe.mlflow_run is not None and outcome.result.tracking is None:
        # A failed run is worth finding too: what it logged before it failed is on the server.
        tracking = recipe.mlflow_run.reference()
        outcome = replace(outcome, result=outcome.result.model_copy(update={"tracking": tracking}))
    if publishing and rank.distributed:
        # Every rank ends as rank 0 ended: the pods of a group exit alike and report one result.
        shared = share_from_main(
            rank, {"exitCode": outcome.exit_code, "result": outputs.result_json(outcome.result)}
        )
        outcome = RunOutcome(
            int(shared["exitCode"]),
            TrainerResult.model_validate(shared["result"]),
            outcome.output_dir,
        )
    return outcome


def _is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)
