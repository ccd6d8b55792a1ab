"""The console's pure parts: the HTML it renders from a job, and the new-job form's checks (the
same as ``kubetune validate``'s). The browser tests (test_console_browser.py) show them in use."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.server import console_form
from kubetune.server.console_html import esc, tag
from kubetune.server.console_job_html import job_live, job_row, timeline

pytestmark = pytest.mark.unit

MARKUP = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def job(**status: object) -> dict[str, object]:
    return {
        "metadata": {"name": "demo", "namespace": "team-a",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"model": {"uri": "m"}},
        "status": status,
    }  # fmt: skip


def test_tag_escapes_every_value_and_keeps_markup_made_here() -> None:
    inner = tag("<b>{x}</b>", x=MARKUP)
    outer = tag('<p title="{t}">{inner}</p>', t='"quoted"', inner=inner)
    assert "<script>" not in outer and "<img" not in outer
    assert outer.startswith('<p title="&quot;quoted&quot;"><b>&lt;script&gt;')
    assert esc(None) == ""


def test_answers_conditions_and_failure_messages_are_escaped() -> None:
    rendered = job_live(
        job(
            phase="Failed",
            conditions=[
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "X",
                    "message": MARKUP,
                    "lastTransitionTime": "2026-01-01T00:00:01Z",
                }
            ],
            result={
                "outcome": "Failed",
                "reason": "DatasetError",
                "message": MARKUP,
                "evaluation": {"samples": [{"prompt": MARKUP, "base": MARKUP, "adapter": MARKUP}]},
            },
        ),
        [{"reason": "Odd", "message": MARKUP, "type": "Warning"}],
    )
    assert "<script>" not in rendered and "<img" not in rendered
    assert rendered.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 6
    assert 'data-final="true"' in rendered


def test_a_running_row_shows_phase_progress_sparkline_eta_and_estimate() -> None:
    history = [{"step": i, "loss": 3.0 / i} for i in range(1, 5)]
    row = job_row(
        job(
            phase="Running",
            progress={"percent": 40.0, "loss": 0.75, "etaSeconds": 95, "history": history},
            estimate={"gpuKind": "L4", "peakGiB": 12.25, "seconds": 3700},
        )
    )
    assert 'data-phase="Running"' in row and 'value="40.0"' in row
    assert "<polyline" in row and "1m 35s" in row and "L4 · 12.2 GiB · 1h 01m" in row


def valid_form() -> dict[str, str]:
    return {
        "metadata.name": "from-form",
        "spec.model.uri": "meta-llama/Llama-2-7b-hf",
        "spec.dataset.uri": "pvc://data/train.jsonl",
        "spec.output.uri": "pvc://adapters/from-form",
        "spec.training.learningRate": "5e-4",
        "spec.lora.r": "16",
        "spec.evaluation.prompts": "Reverse: abc\n\n  Reverse: kube  \n",
    }


def test_a_filled_form_makes_the_manifest_with_typed_numbers_and_only_the_filled_fields() -> None:
    manifest = console_form.manifest_of(valid_form(), "team-a")
    assert console_form.problems_of(manifest) == []
    assert manifest["metadata"] == {"name": "from-form", "namespace": "team-a"}
    assert manifest["spec"]["training"] == {"learningRate": 0.0005}
    assert manifest["spec"]["lora"] == {"r": 16}
    assert manifest["spec"]["evaluation"] == {"prompts": ["Reverse: abc", "Reverse: kube"]}
    assert "resources" not in manifest["spec"]


def test_the_form_names_the_field_the_models_refuse() -> None:
    values = valid_form() | {"spec.lora.r": "sixteen", "metadata.name": "Bad_Name"}
    problems = console_form.problems_of(console_form.manifest_of(values, "team-a"))
    assert any(p.startswith("spec.lora.r: ") for p in problems), problems
    assert any(p.startswith("metadata.name: must be a DNS label") for p in problems), problems


_FIELD_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["nan", "inf", "1e999", "9" * 5000, "1_0", "0x10", "[1]", "{a: b}", "<script>x()</script>"]
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from([f.path for f in console_form.FIELDS]), _FIELD_TEXT),
    st.text(max_size=12),
)
def test_any_form_post_is_a_manifest_or_problems_by_field_and_renders_back(
    values: dict[str, str], namespace: str
) -> None:
    """Whatever a tenant types, the console answers with a manifest or the problems, each
    naming its field, and the form comes back with the markup escaped: never a server error."""
    manifest = console_form.manifest_of(values, namespace, {"training": {"maxSteps": 10}})
    problems = console_form.problems_of(manifest)
    assert all(isinstance(p, str) and ":" in p for p in problems)
    console_form.manifest_yaml(manifest)
    page = console_form.render_form(values, ["team-a"], namespace, problems, csrf="c")
    assert "<script" not in page.replace('<script src="/ui/static/', "")


def test_the_form_shows_the_models_defaults() -> None:
    assert console_form.default_of("spec.training.batchSize") == "16"
    assert console_form.default_of("spec.dataset.format") == "auto"
    assert console_form.default_of("spec.lora.r") == "16"


def test_the_form_starts_from_the_platforms_job_template_and_shows_its_values() -> None:
    template = {"training": {"maxSteps": 10, "learningRate": 0.01}, "resources": {"gpus": 0}}
    manifest = console_form.manifest_of(valid_form(), "team-a", template)
    assert manifest["spec"]["training"] == {"maxSteps": 10, "learningRate": 0.0005}
    assert manifest["spec"]["resources"] == {"gpus": 0}
    assert template["training"]["learningRate"] == 0.01  # the template itself is untouched
    assert console_form.default_of("spec.resources.gpus", template) == "0"
    assert console_form.default_of("spec.training.batchSize", template) == "16"


def test_preference_tuning_shows_its_latest_rewards() -> None:
    rendered = job_live(
        job(phase="Running", progress={"rewardAccuracy": 0.75, "rewardMargin": 1.5}), []
    )
    assert '<p id="preference">reward accuracy 0.75 · reward margin 1.5</p>' in rendered
    assert 'id="preference"' not in job_live(job(phase="Running", progress={"loss": 1.0}), [])


@pytest.mark.parametrize(
    ("target", "kept"),
    [
        ("/ui/jobs/a/b", "/ui/jobs/a/b"),
        ("/ui/?namespace=a", "/ui/?namespace=a"),
        ("//evil.example/ui/", "/ui/"),
        ("https://evil.example/ui/", "/ui/"),
        ("/ui/\\evil", "/ui/"),
        ("/v1/files", "/ui/"),
        (None, "/ui/"),
    ],
)
def test_after_sign_in_the_console_goes_only_to_its_own_pages(
    target: str | None, kept: str
) -> None:
    from kubetune.server.console_core import _safe_next

    assert _safe_next(target) == kept


def test_the_local_console_refuses_every_token_but_its_session() -> None:
    from kubetune.cli.ui import KubeconfigKube
    from kubetune.server.errors import ApiError
    from kubetune.server.kube import Endpoint

    kube = KubeconfigKube(Endpoint("https://127.0.0.1:1", False), 1, "session", {"X": "y"})
    assert kube.credentials("session") == {"X": "y"}
    with pytest.raises(ApiError) as refused:
        kube.credentials("someone-else")
    assert refused.value.status == 401


def test_the_yaml_shows_uris_without_their_credentials() -> None:
    from kubetune.server.console_job_html import job_yaml

    signed = "http://server:8080/datasets/team-a/file-1.jsonl?expires=1&signature=abc123"
    shown = job_yaml(
        {"metadata": {"name": "x", "managedFields": [{"manager": "kubectl"}]},
         "spec": {"dataset": {"uri": signed}, "model": {"uri": "s3://u:p@bucket/m"}}}
    )  # fmt: skip
    assert "signature" not in shown and "abc123" not in shown and "u:p@" not in shown
    assert "uri: http://server:8080/datasets/team-a/file-1.jsonl" in shown
    assert "managedFields" not in shown


def test_the_timeline_puts_events_of_one_second_in_the_order_they_happened() -> None:
    job = {"metadata": {"name": "tiny", "creationTimestamp": "2026-01-01T00:09:00Z"}}
    second = "2026-01-01T00:10:00"
    # Listed as the apiserver may list them (by their generated names), not as they happened.
    events = [
        {"reason": "Succeeded", "message": "the trainer finished", "lastTimestamp": f"{second}Z",
         "eventTime": f"{second}.900000Z"},
        {"reason": "Running", "message": "the trainer is running", "lastTimestamp": f"{second}Z",
         "eventTime": f"{second}.100000Z"},
    ]  # fmt: skip
    shown = str(timeline(job, events))
    assert shown.index("Created") < shown.index("Event Running") < shown.index("Event Succeeded")
