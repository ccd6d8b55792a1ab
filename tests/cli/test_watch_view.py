"""What `kubetune watch` shows a person while a job runs and when it ends."""

from __future__ import annotations

import pytest

from kubetune.api.models import FineTuneJobStatus
from kubetune.cli.watch import event_line, printable, render_result, render_view, sparkline

pytestmark = pytest.mark.unit


def test_running_job_shows_bar_step_eta_loss_and_sparkline() -> None:
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Running",
            "progress": {
                "step": 30,
                "totalSteps": 60,
                "percent": 50.0,
                "loss": 1.2345,
                "etaSeconds": 95,
                "tokensPerSecond": 1234.0,
                "learningRate": 0.001,
            },
        }
    )
    view = render_view("tiny", status, [3.0, 2.0, 1.2345])
    assert "tiny: Running" in view
    assert " 50.0%" in view and "step 30/60" in view and "ETA 01:35" in view
    assert "loss 1.2345" in view and "1,234 tok/s" in view
    assert "loss █▄▁" in view


def test_a_watch_started_late_draws_the_runs_whole_curve_from_its_status() -> None:
    history = [{"step": 10 * i, "loss": 4.0 - 0.03 * i} for i in range(1, 101)]
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Running",
            "progress": {"step": 1000, "totalSteps": 2000, "percent": 50.0, "loss": 1.0,
                         "history": history},
        }
    )  # fmt: skip
    *_, line = (x for x in render_view("late", status, []).splitlines() if x.startswith("  loss "))
    chart = line.removeprefix("  loss ")
    assert len(chart) == 40 and chart[0] == "█" and chart[-1] == "▁", chart
    assert list(chart) == sorted(chart, reverse=True), "a falling loss draws a falling line"


def test_preference_job_shows_its_reward_metrics_beside_the_loss() -> None:
    progress = {"step": 3, "totalSteps": 6, "percent": 50.0, "loss": 0.5, "rewardAccuracy": 0.875,
                "rewardMargin": 0.75, "chosenReward": 0.25, "rejectedReward": -0.5}  # fmt: skip
    status = FineTuneJobStatus.model_validate({"phase": "Running", "progress": progress})
    view = render_view("dpo", status, [])
    assert "loss 0.5000" in view
    assert "reward accuracy 0.875  margin +0.750  chosen +0.250 / rejected -0.500" in view


def test_an_sft_job_shows_no_reward_line() -> None:
    progress = {"step": 3, "totalSteps": 6, "percent": 50.0, "loss": 0.5}
    status = FineTuneJobStatus.model_validate({"phase": "Running", "progress": progress})
    assert "reward" not in render_view("sft", status, [])


def test_pending_job_says_why_it_waits() -> None:
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
                    "lastTransitionTime": "2026-11-28T00:00:00Z",
                }
            ],
        }
    )
    assert "waiting: Unschedulable: 0/1 nodes are available" in render_view("j", status, [])


def test_result_names_adapter_digest_metrics_and_answers() -> None:
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Succeeded",
            "result": {
                "outcome": "Succeeded",
                "reason": "Completed",
                "adapter": {
                    "uri": "pvc://demo/adapters/tiny",
                    "sha256": "ab" * 32,
                    "sizeBytes": 4096,
                },
                "metrics": {"train_loss": 0.5},
                "evaluation": {
                    "samples": [{"prompt": "reverse: kube", "base": "kkk", "adapter": "ebuk"}]
                },
            },
        }
    )
    text = render_result(status)
    assert "adapter  pvc://demo/adapters/tiny" in text
    assert "sha256   " + "ab" * 32 in text
    assert "train_loss 0.5000" in text
    assert "'reverse: kube' → 'kkk' | 'ebuk'" in text


def test_sparkline_is_flat_for_constant_loss() -> None:
    assert sparkline([1.0, 1.0, 1.0]) == "▁▁▁"
    assert sparkline([]) == ""


def test_validated_job_shows_its_estimate() -> None:
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Pending",
            "estimate": {"examples": 512, "tokens": 6170, "sequences": 103, "steps": 7,
                         "gpuKind": "H200", "peakGiB": 36.7, "seconds": 3725, "sampled": True},
        }
    )  # fmt: skip
    view = render_view("held", status, [])
    assert (
        "estimate: 512 examples, about 6,170 tokens/epoch, 7 steps, peak 36.7 GiB on H200, "
        "about 1:02:05 of training"
    ) in view


#: What a hostile dataset's column name or host could put in a message: a cleared screen,
#: colours, a window title, a hyperlink that shows one thing and opens another, a clipboard
#: write (OSC 52), a one-byte CSI, a bell, a carriage return that hides the line before it, a
#: right-to-left override and a line that forges another.
HOSTILE = (
    "col\x1b[2J\x1b[31mred\x1b[0m \x1b]0;owned\x07\x1b]8;;https://evil.example\x1b\\"
    "click\x1b]8;;\x1b\\ \x1b]52;c;ZXZpbA==\x07\x9b31m\x07\rnext\u202eabc\nresult: Succeeded"
)
CONTROLS = [chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0))] + ["\u202e"]


def assert_printable(text: str) -> None:
    for char in CONTROLS:
        if char != "\n":
            assert char not in text, f"{char!r} reaches the terminal in {text!r}"


def test_control_characters_and_escapes_never_reach_the_terminal() -> None:
    failed = FineTuneJobStatus.model_validate(
        {
            "phase": "Failed",
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "DatasetError",
                 "message": HOSTILE, "lastTransitionTime": "2026-11-28T00:00:00Z"},
            ],
            "result": {"outcome": "Failed", "reason": "DatasetError", "message": HOSTILE,
                       "metrics": {HOSTILE: 1.0}},
        }
    )  # fmt: skip
    view, summary = render_view("j", failed, []), render_result(failed)
    event = event_line("Warning", "DatasetError", HOSTILE)
    for text in (view, summary, event):
        assert_printable(text)
        assert "colred click" in text  # the words stay, the escapes go
        assert "owned" not in text and "evil.example" not in text and "ZXZpbA" not in text
    # One field stays on its line: no forged "result: Succeeded" of its own.
    assert not any(line.startswith("result: Succeeded") for line in view.splitlines())
    assert [line for line in summary.splitlines() if line.startswith("result:")] == [
        summary.splitlines()[0]
    ]
    assert event.count("\n") == 0


def test_printable_keeps_text_tabs_and_wanted_line_breaks() -> None:
    assert printable("loss 0.5\tstep 3 → ünïcode ✓") == "loss 0.5\tstep 3 → ünïcode ✓"
    assert printable("a\nb", newlines=True) == "a\nb"
    assert printable("a\nb") == "a b"
