"""Checkpoints: where they are, which run owns them, their copy in an object store, and SIGTERM.

The trainer checkpoints under ``<output>/checkpoints`` every ``training.checkpointSteps`` and when
the pod is asked to stop, and a restarted pod resumes from the newest complete one. Only the run
that wrote them may resume them: a marker file names it, created exclusively, and a folder with
checkpoints but no readable marker of this run is refused rather than continued or overwritten;
the same rule holds the object-store copy of an s3:// or gs:// output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from kubetune.api.config import TrainerConfig
from kubetune.api.uris import display_uri
from kubetune.trainer import locations
from kubetune.trainer.errors import InvalidConfig, first_line

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
#: The newest checkpoint may be half-written when the pod was killed; keep the one before it.
CHECKPOINTS_KEPT = 2
#: Names the run that owns a checkpoints folder (see ``claim``).
RUN_MARKER = "run.json"
#: transformers writes this last: a checkpoint without it is incomplete.
TRAINER_STATE = "trainer_state.json"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def checkpoint_dirs(directory: Path) -> list[Path]:
    """Every ``checkpoint-N`` folder, complete or not, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.is_dir()
        and p.name.startswith(CHECKPOINT_PREFIX)
        and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=checkpoint_step)


def newest_checkpoint(directory: Path) -> Path | None:
    """The highest-step checkpoint that was completely written (its trainer state is last)."""
    complete = [p for p in checkpoint_dirs(directory) if (p / TRAINER_STATE).is_file()]
    return complete[-1] if complete else None


# --- ownership ---------------------------------------------------------------------------------


def run_identity(config: TrainerConfig) -> str:
    """Who may resume these checkpoints: the FineTuneJob (its uid survives pod retries), or for
    local runs the resolved spec itself."""
    if config.job is not None and config.job.uid:
        return f"finetunejob/{config.job.uid}"
    spec = config.spec.model_dump_json(by_alias=True, exclude_none=True)
    return "spec/" + hashlib.sha256(spec.encode()).hexdigest()[:16]


def _owner(fs: Any, marker: str) -> str | None:
    """The run a marker names; None for a marker that is unreadable or not ours to parse."""
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        content = json.loads(fs.cat_file(marker).decode("utf-8"))
        if isinstance(content, dict) and isinstance(content.get("run"), str):
            return str(content["run"])
    return None


def _has_checkpoints(fs: Any, root: str) -> bool:
    with contextlib.suppress(FileNotFoundError):
        for entry in fs.ls(root, detail=False):
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit():
                return True
    return False


def claim(
    checkpoint_dir: Path | str,
    identity: str,
    output_uri: str,
    finished: bool = False,
    fs: Any = None,
) -> None:
    """Make ``identity`` the owner of ``checkpoint_dir`` (a local folder, or with ``fs`` a
    prefix in an fsspec store), or refuse (InvalidConfig) where another run's work is there: its
    checkpoints, or (``finished``) the adapter it published. A new job pointed at an old job's
    output would otherwise continue someone else's run, or overwrite their adapter.

    The marker is created exclusively (``xb``), so of two runs claiming at once one wins; a store
    that can't create exclusively is written after a look, with a short race (docs/trainer.md)."""
    import fsspec

    fs = fs or fsspec.filesystem("file")
    root = str(checkpoint_dir).rstrip("/")
    marker = f"{root}/{RUN_MARKER}"
    where = display_uri(output_uri)
    start_over = f"use another output.uri, or remove {where} to start over"
    for _ in range(2):
        theirs = _has_checkpoints(fs, root)
        what = "checkpoints" if theirs else "finished adapter"
        if fs.exists(marker):
            owner = _owner(fs, marker)
            if owner == identity:
                return
            if theirs or finished:
                whose = f"another run ({owner})" if owner else "a run it can't identify"
                raise InvalidConfig(f"output.uri {where} already holds the {what} of {whose}; "
                                    + start_over)  # fmt: skip
            # A marker with nothing left behind it (its checkpoints removed): take it over.
            _write_marker(fs, marker, identity)
            return
        if theirs or finished:
            held = "checkpoints" if theirs else "a finished adapter"
            raise InvalidConfig(
                f"output.uri {where} already holds {held} but no marker ({RUN_MARKER}) says of "
                "which run; " + start_over
            )
        fs.makedirs(root, exist_ok=True)
        try:
            with fs.open(marker, "xb") as f:
                f.write(_marker_bytes(identity))
            return
        except FileExistsError:
            continue  # another pod claimed it a moment ago: look again at whose it is
        except (ValueError, NotImplementedError):
            _write_marker(fs, marker, identity)  # the store has no exclusive create
            return
    raise InvalidConfig(f"output.uri {where} is being claimed by another run at the same time")


def _marker_bytes(identity: str) -> bytes:
    return (json.dumps({"run": identity}) + "\n").encode()


def _write_marker(fs: Any, marker: str, identity: str) -> None:
    """Replace the marker whole: an object is replaced atomically by a put; a local file
    through a rename."""
    partial = marker + ".partial"
    fs.pipe_file(partial, _marker_bytes(identity))
    fs.mv(partial, marker)


# --- object stores -----------------------------------------------------------------------------


class RemoteCheckpoints:
    """The checkpoints of an ``s3://``/``gs://`` output: pulled into the local staging folder
    before training, and each new one pushed after it is saved. A failed copy costs a warning:
    the run goes on, and only resuming after a preemption needs them."""

    def __init__(self, output_uri: str, local_dir: Path) -> None:
        self.output_uri = output_uri
        self.remote = f"{output_uri.rstrip('/')}/{CHECKPOINTS_DIR}"
        self.local_dir = local_dir
        self.shown = display_uri(output_uri)

    def claim(self, identity: str, finished_file: str) -> None:
        """The ownership rule of ``claim``, held by the store's copy (the one every pod sees)."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.remote)
        finished = fs.exists(f"{root.rstrip('/').rsplit('/', 1)[0]}/{finished_file}")
        claim(root, identity, self.output_uri, finished, fs=fs)

    def pull(self) -> None:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(self.remote)
            if fs.exists(root):
                self.local_dir.mkdir(parents=True, exist_ok=True)
                fs.get(root.rstrip("/") + "/", str(self.local_dir), recursive=True)
        except Exception as exc:
            log.warning("could not fetch checkpoints from %s: %s", self.shown, first_line(exc))

    def push_newest(self) -> None:
        newest = newest_checkpoint(self.local_dir)
        if newest is None:
            return
        try:
            locations.upload_directory(newest, f"{self.remote}/{newest.name}")
        except Exception as exc:
            log.warning("could not upload checkpoint %s: %s", newest.name, first_line(exc))


# --- SIGTERM -----------------------------------------------------------------------------------


class PreemptionGuard:
    """Turns SIGTERM into "checkpoint now, then stop" instead of dying mid-step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("SIGTERM received: checkpointing after this step, then stopping")
        self.requested = True

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def checkpoint_callback(
    guard: PreemptionGuard,
    saved: Callable[[], None],
    stop_requested: Callable[[], bool] | None = None,
) -> Any:
    """The TrainerCallback that saves and stops after the step in which SIGTERM came, and calls
    ``saved`` after every checkpoint (built late: transformers is a heavy import).

    ``stop_requested()`` says whether SIGTERM came to any rank of the group (every rank
    calls it after every step): the ranks of a group must save the same step, together."""
    from transformers import TrainerCallback

    def requested() -> bool:
        return stop_requested() if stop_requested is not None else guard.requested

    class CheckpointCallback(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if requested():
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            saved()

    return CheckpointCallback()
