"""The Argo CD health check for FineTuneJob, run by a real Lua interpreter (lupa) as Argo CD runs
it: the object as a global ``obj``, the script's return value a {status, message} table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "argocd" / "health.lua"


def lua_runtime() -> Any:
    # Argo CD runs gopher-lua (Lua 5.1 semantics); prefer lupa's 5.1 build when it has one.
    try:
        from lupa import lua51 as lupa
    except ImportError:
        import lupa  # type: ignore[no-redef]
    return lupa.LuaRuntime(unpack_returned_tuples=True)


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = lua_runtime()

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    lua.globals().obj = to_lua(obj)
    result = lua.execute(SCRIPT.read_text())
    return result["status"], result["message"]


def ftj(status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny", "generation": generation},
        "spec": {"model": {"uri": "m"}, **spec},
    }
    if status is not None:
        obj["status"] = {"observedGeneration": generation, **status}
    return obj


def condition(type_: str, status: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def test_a_new_job_is_progressing_until_the_operator_reports() -> None:
    assert health(ftj()) == ("Progressing", "Waiting for the kubetune operator")


def test_a_job_suspended_before_the_operator_saw_it_is_suspended() -> None:
    assert health(ftj(runPolicy={"suspend": True}))[0] == "Suspended"


@pytest.mark.parametrize("phase", ["Pending", "Queued", "Running"])
def test_unfinished_phases_are_progressing(phase: str) -> None:
    assert health(ftj({"phase": phase}))[0] == "Progressing"


def test_a_running_job_reports_its_progress() -> None:
    status = {"phase": "Running", "progress": {"percent": 42.0, "step": 21, "totalSteps": 50}}

    assert health(ftj(status)) == ("Progressing", "42% done (step 21/50)")


def test_a_succeeded_job_is_healthy_and_names_its_adapter() -> None:
    status = {
        "phase": "Succeeded",
        "conditions": [condition("Succeeded", "True", "Completed")],
        "result": {"outcome": "Succeeded", "reason": "Completed",
                   "adapter": {"uri": "pvc://adapters/tiny", "sha256": "ab", "sizeBytes": 1}},
    }  # fmt: skip

    assert health(ftj(status)) == ("Healthy", "Adapter at pvc://adapters/tiny")


def test_a_true_failed_condition_is_degraded_whatever_the_phase() -> None:
    status = {"phase": "Running", "conditions": [condition("Failed", "True", "OOMKilled")]}

    assert health(ftj(status))[0] == "Degraded"


@pytest.mark.parametrize(
    ("phase", "reported", "expected"),
    [
        pytest.param(
            "Pending",
            condition("Ready", "False", "Unschedulable", "no node has nvidia.com/gpu"),
            ("Progressing", "Unschedulable: no node has nvidia.com/gpu"),
            id="an-unschedulable-job-says-why-it-waits",
        ),
        pytest.param(
            "Failed",
            condition("Failed", "True", "DatasetError", "data.jsonl not found"),
            ("Degraded", "DatasetError: data.jsonl not found"),
            id="a-failed-job-is-degraded-with-the-reason",
        ),
        pytest.param(
            "Suspended",
            condition("Suspended", "True", "Suspended", "suspended by spec"),
            ("Suspended", "suspended by spec"),
            id="a-suspended-job-is-suspended",
        ),
    ],
)
def test_a_job_with_a_condition_shows_its_health_and_why(
    phase: str, reported: dict[str, str], expected: tuple[str, str]
) -> None:
    status = {"phase": phase, "conditions": [reported]}

    assert health(ftj(status)) == expected


def test_a_spec_change_not_yet_observed_is_progressing() -> None:
    obj = ftj({"phase": "Succeeded"}, generation=3)
    obj["status"]["observedGeneration"] = 2

    assert health(obj)[0] == "Progressing"
