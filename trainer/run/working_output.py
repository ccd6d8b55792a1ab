"""Where a run writes while it trains, and the claim that keeps two runs out of one location.

The output location, or for an ``oci://`` output its ``checkpointUri`` (the artifact is pushed from
there once the adapter is saved); an object store is written through a local staging copy.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.config import TrainerConfig
from kubetune.api.models import FineTuneJobSpec
from kubetune.api.uris import CHECKPOINT_SCHEMES, OUTPUT_SCHEMES, display_uri
from kubetune.trainer import locations
from kubetune.trainer.errors import InvalidConfig
from kubetune.trainer.publish import outputs
from kubetune.trainer.run.checkpoints import CHECKPOINTS_DIR, RemoteCheckpoints, claim, run_identity


@dataclass(frozen=True)
class WorkingOutput:
    """The location a run writes to, and the local folder it writes through."""

    location: locations.Location
    #: The folder the run writes: the location itself, or an object store's staging copy.
    directory: Path
    #: An object store's checkpoints, uploaded as they change (None for a local location).
    remote: RemoteCheckpoints | None
    #: The spec's field that names the location, for messages.
    field: str

    @property
    def checkpoint_dir(self) -> Path:
        return self.directory / CHECKPOINTS_DIR


def working_output(spec: FineTuneJobSpec) -> WorkingOutput:
    """The run's working location resolved (InvalidConfig naming the field)."""
    working = spec.output.working_uri
    field = "output.checkpointUri" if spec.output.is_oci else "output.uri"
    try:
        location = locations.resolve(
            working, CHECKPOINT_SCHEMES if spec.output.is_oci else OUTPUT_SCHEMES, "output"
        )
    except ValueError as exc:
        raise InvalidConfig(f"{field}: {exc}") from None
    if location.is_local:
        assert location.path is not None
        return WorkingOutput(location, location.path, None, field)
    # Object stores are written through a local staging copy, uploaded as it changes; its path
    # shows in messages, so it is named without the URI's credentials.
    staging = locations.cache_root() / "output" / display_uri(working).replace("://", "/")
    return WorkingOutput(
        location, staging, RemoteCheckpoints(working, staging / CHECKPOINTS_DIR), field
    )


def claim_output(output: WorkingOutput, config: TrainerConfig) -> None:
    """A writable output location that holds no other run's work (see checkpoints.claim)."""
    try:
        output.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.directory, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise InvalidConfig(
            f"output location {output.directory} is not writable ({output.field} "
            f"{display_uri(config.spec.output.working_uri)}): {exc.strerror}"
        ) from None
    if output.remote is not None:
        output.remote.claim(run_identity(config), outputs.ADAPTER_WEIGHTS)
    else:
        finished = (output.directory / outputs.ADAPTER_WEIGHTS).exists()
        claim(output.checkpoint_dir, run_identity(config), config.spec.output.working_uri, finished)
