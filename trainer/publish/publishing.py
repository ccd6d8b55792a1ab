"""Publishing a trained adapter: its files, what describes it, result.json, and its delivery.

Once the adapter's weights are on disk nothing that follows may lose them. Each later step runs
on its own; a failure is logged with its traceback and recorded, and the result says what was
done and what wasn't. A report that fails (held-out loss, evaluation prompts, loss curve, model
card) leaves the run Succeeded, with a note. A delivery the spec asked for (merge, push to the
hub, upload to the object store, push to an OCI registry) that fails makes it Failed with exit 1,
the adapter still in the result: the Job retries, and the retry resumes from the final checkpoint
straight to publishing.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kubetune.api.contract import ExitCode, Reason
from kubetune.api.models import AdapterRef, FineTuneJobSpec, TrainerResult
from kubetune.api.uris import display_uri, oci_reference
from kubetune.trainer import locations
from kubetune.trainer.errors import first_line
from kubetune.trainer.publish import outputs
from kubetune.trainer.publish.digests import sha256_file
from kubetune.trainer.run.checkpoints import CHECKPOINTS_DIR
from kubetune.trainer.run.tracking import MlflowRun, tracking_failure
from kubetune.trainer.secrets import HubTokens, redact, redact_result, redact_text_files

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Publication:
    result: TrainerResult
    exit_code: ExitCode


@dataclass(kw_only=True, eq=False, repr=False)
class Publisher:
    """Writes one run's adapter into its output location and delivers it where the spec says."""

    name: str
    spec: FineTuneJobSpec
    output: locations.Location
    output_dir: Path
    tokens: HubTokens
    mlflow_run: MlflowRun | None = None
    #: One line per step that failed after the adapter was saved.
    failures: list[str] = field(default_factory=list, init=False)
    delivery_failed: bool = field(default=False, init=False)
    #: The adapter's own files: what goes to the hub.
    adapter_files: list[str] = field(default_factory=list, init=False)
    _tokenizer: Any = field(default=None, init=False)

    @property
    def secrets(self) -> list[str]:
        """Every form of every secret of the run: none of them reaches a file written here."""
        return self.tokens.secrets

    def save_adapter(self, model: Any, tokenizer: Any) -> AdapterRef:
        """The adapter and its tokenizer; a failure here is the run's (nothing is saved yet)."""
        model.save_pretrained(self.output_dir)
        written = tokenizer.save_pretrained(self.output_dir)
        redact_text_files(self.output_dir, self.secrets)
        self._tokenizer = tokenizer
        self.adapter_files = [outputs.ADAPTER_WEIGHTS, outputs.ADAPTER_CONFIG]
        self.adapter_files += sorted({Path(f).name for f in written} - set(self.adapter_files))
        weights = self.output_dir / outputs.ADAPTER_WEIGHTS
        return AdapterRef(
            uri=display_uri(self.spec.output.uri),
            sha256=sha256_file(weights),
            size_bytes=weights.stat().st_size,
        )

    def attempt(
        self,
        what: str,
        action: Callable[[], T],
        *,
        delivery: bool = False,
        describe: Callable[[BaseException], str] | None = None,
    ) -> T | None:
        """``action()``, or None with the failure recorded: the adapter is saved, and stays."""
        try:
            return action()
        except Exception as exc:
            log.error("%s failed after the adapter was saved", what, exc_info=True)
            why = describe(exc) if describe else f"{type(exc).__name__}: {first_line(exc, 300)}"
            self.failures.append(f"{what} failed ({why})")
            self.delivery_failed = self.delivery_failed or delivery
            return None

    def publish(
        self, result: TrainerResult, effective: dict[str, Any], metrics_file: Path
    ) -> Publication:
        """Loss curve, model card, merge, hub push, the MLflow run's tags, result.json and the
        upload, in that order (the object store gets the result.json that says how the rest
        went)."""
        curve = self.output_dir / outputs.LOSS_CURVE_FILE
        self.attempt(
            "loss curve",
            lambda: outputs.plot_loss_curve(outputs.read_metrics(metrics_file), curve, self.name),
        )
        card = self.output_dir / outputs.MODEL_CARD_FILE
        self.attempt(
            "model card",
            lambda: card.write_text(
                redact(outputs.model_card(self.name, self.spec, result, effective), self.secrets),
                encoding="utf-8",
            ),
        )
        if self.spec.output.merge:
            self.attempt("merge", self._merge, delivery=True)
        if self.spec.output.push_to_hub is not None:
            self.attempt("push to hub", self._push_to_hub, delivery=True)
        if self.mlflow_run is not None:
            tracked = self.mlflow_run
            # A tenant names the tracking server: what it answers stays in the log (describe).
            self.attempt(
                "MLflow tags",
                lambda: tracked.tag_result(self.concluded(result)),
                describe=tracking_failure,
            )
        concluded = self.concluded(result)
        outputs.write_result(self.output_dir, concluded)
        if self.spec.output.is_oci:
            # result.json goes into the artifact as it stands (naming the tag: the digest is
            # the artifact's own); the copy beside the checkpoints and status get the digest.
            where = display_uri(self.spec.output.uri)
            pushed = self.attempt(f"push to {where}", self._push_oci, delivery=True)
            if pushed is not None:
                pinned = oci_reference(self.spec.output.uri, "output").pinned(pushed)
                assert result.adapter is not None
                result = result.model_copy(
                    update={"adapter": result.adapter.model_copy(update={"uri": pinned})}
                )
            concluded = self.concluded(result)
            outputs.write_result(self.output_dir, concluded)
        elif not self.output.is_local:
            where = display_uri(self.spec.output.uri)
            failed_before = len(self.failures)
            self.attempt(f"upload to {where}", self._upload, delivery=True)
            if len(self.failures) > failed_before:
                concluded = self.concluded(result)
                outputs.write_result(self.output_dir, concluded)
        exit_code = ExitCode.UNEXPECTED if self.delivery_failed else ExitCode.SUCCEEDED
        return Publication(concluded, exit_code)

    def concluded(self, result: TrainerResult) -> TrainerResult:
        """``result`` with what failed after the adapter was saved, if anything did, and no
        secret in it (a failure's message may quote one)."""
        return redact_result(self._with_failures(result), self.secrets)

    def _with_failures(self, result: TrainerResult) -> TrainerResult:
        if not self.failures:
            return result
        failed = "; ".join(self.failures)
        if not self.delivery_failed:
            return result.model_copy(update={"message": f"{result.message}; not done: {failed}"})
        return result.model_copy(
            update={
                "outcome": "Failed",
                "reason": Reason.TRAINER_ERROR,
                "message": (
                    f"{result.message}, but {failed}; the adapter is saved, and a retry "
                    "resumes from the final checkpoint to publish it again"
                ),
            }
        )

    # --- deliveries ----------------------------------------------------------------------------

    def _merge(self) -> None:
        """Base + adapter as one model in the compute dtype (not 4-bit: it is for serving), into
        the base output.mergeBase names (merging.py says why there are two)."""
        from kubetune.trainer.publish.merging import merge_adapter

        target = self.output_dir / outputs.MERGED_DIR
        merge_adapter(
            self.spec,
            self.output_dir,
            target,
            into=self.spec.output.merge_base,
            token=self.tokens.read,
            tokenizer=self._tokenizer,
        )
        redact_text_files(target, self.secrets)

    def _push_to_hub(self) -> None:
        """The adapter's own files and its description; never checkpoints, result or logs."""
        from huggingface_hub import HfApi

        push = self.spec.output.push_to_hub
        assert push is not None
        api = HfApi(token=self.tokens.for_push)
        api.create_repo(push.repo_id, private=push.private, exist_ok=True)
        described = [outputs.MODEL_CARD_FILE, outputs.LOSS_CURVE_FILE]
        api.upload_folder(
            repo_id=push.repo_id,
            folder_path=str(self.output_dir),
            allow_patterns=[*self.adapter_files, *described],
        )

    def _push_oci(self) -> str:
        """The adapter's files, its model card, loss curve and result.json as one ModelPack
        artifact (or KAITO's adapter image, where output.registry.layout says so); the
        manifest's digest."""
        from kubetune.trainer.publish.registry import push_adapter

        described = [outputs.MODEL_CARD_FILE, outputs.LOSS_CURVE_FILE, outputs.RESULT_FILE]
        files = [
            self.output_dir / name
            for name in [*self.adapter_files, *described]
            if (self.output_dir / name).is_file()
        ]
        registry = self.spec.output.registry
        reference = oci_reference(self.spec.output.uri, "output")
        plain_http = registry is not None and registry.plain_http
        base_model = display_uri(self.spec.model.uri)
        if registry is not None and registry.layout == "kaito":
            from kubetune.trainer.publish.kaito_image import push_kaito_image

            pushed = push_kaito_image(
                reference, files, name=self.name, base_model=base_model, plain_http=plain_http
            )
        else:
            pushed = push_adapter(
                reference,
                files,
                weights=outputs.ADAPTER_WEIGHTS,
                name=self.name,
                base_model=base_model,
                precision=safetensors_precision(self.output_dir / outputs.ADAPTER_WEIGHTS),
                plain_http=plain_http,
            )
        log.info("pushed %s as %s", display_uri(self.spec.output.uri), pushed.digest)
        return pushed.digest

    def _upload(self) -> None:
        staging = Path(tempfile.mkdtemp(prefix="kubetune-upload-"))
        try:
            for item in self.output_dir.iterdir():
                if item.name == CHECKPOINTS_DIR:
                    continue
                if item.is_dir():
                    shutil.copytree(item, staging / item.name)
                else:
                    shutil.copy2(item, staging / item.name)
            locations.upload_directory(staging, self.spec.output.uri)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


_PRECISIONS = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}


def safetensors_precision(path: Path) -> str:
    """The weights' precision as ModelPack names it (fp32, bf16, ...; ``mixed`` for several),
    read from the safetensors header."""
    import json
    import struct

    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        return _PRECISIONS.get(str(dtype), str(dtype).lower())
    return "mixed"
