"""The pure mappings between OpenAI's fine-tuning shapes and FineTuneJobs (no cluster)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.api.models import FineTuneJobSpec
from kubetune.server import mapping
from kubetune.server.errors import ApiError
from kubetune.server.manifest import job_manifest

pytestmark = pytest.mark.unit

TEMPLATE = {"training": {"maxSteps": 10, "learningRate": 1.0e-2, "batchSize": 4}}
URL = "http://server/datasets/team-a/file-0123456789abcdef01234567.jsonl?expires=1&signature=x"


def manifest(**request: Any) -> dict[str, Any]:
    return job_manifest(
        "ftjob-1", "team-a", {"model": "tiny", "training_file": "file-1", **request},
        model_uri="pvc://work/model", dataset_uri=URL, template=TEMPLATE,
        output_uri="pvc://work/adapters/ftjob-1",
    )  # fmt: skip


def job(phase: str | None = None, **status: Any) -> dict[str, Any]:
    made = manifest(suffix="s")
    made["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    made["metadata"]["resourceVersion"] = "1"
    made["status"] = {"phase": phase, **status} if phase else {}
    return made


def test_a_create_request_becomes_the_template_with_the_requests_choices() -> None:
    made = manifest(
        hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5},
        seed=7, suffix="support", metadata={"team": "a"},
    )  # fmt: skip
    spec = made["spec"]
    assert spec["model"] == {"uri": "pvc://work/model"}
    assert spec["dataset"] == {"uri": URL, "format": "auto"}
    assert spec["output"] == {"uri": "pvc://work/adapters/ftjob-1"}
    assert spec["training"] == {"epochs": 2, "batchSize": 8, "learningRate": 5.0e-3, "seed": 7}
    annotations = made["metadata"]["annotations"]
    assert annotations[mapping.TRAINING_FILE] == "file-1"
    assert annotations[mapping.SUFFIX] == "support"
    assert made["metadata"]["namespace"] == "team-a"


def test_auto_leaves_the_templates_values() -> None:
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert manifest(hyperparameters=auto)["spec"]["training"] == TEMPLATE["training"]
    nested = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}
    assert manifest(method=nested)["spec"]["training"]["epochs"] == 3


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": "many"}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"warmup": 1}}, "hyperparameters"),
        ({"seed": -1}, "seed"),
        ({"suffix": "a/b"}, "suffix"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 1}}}},
            "hyperparameters",
        ),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            "hyperparameters.beta",
        ),
        # Shapes no object of OpenAI's has (each was a 500 before): the property test below.
        ({"method": {"type": []}}, "method.type"),
        ({"method": []}, "method"),
        ({"method": {"type": "supervised", "supervised": True}}, "method.supervised"),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": [["beta", 1]]}}},
            "method.dpo.hyperparameters",
        ),
        ({"hyperparameters": [[None, None]]}, "hyperparameters"),
        ({"hyperparameters": True}, "hyperparameters"),
        ({"hyperparameters": {"n_epochs": float("inf")}}, "hyperparameters.n_epochs"),
    ],
)
def test_bad_requests_name_their_field(request_fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        manifest(**request_fields)
    assert (refused.value.status, refused.value.param) == (400, param)


_text = st.text(max_size=20)
_json = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(), _text, st.just("auto")
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=10,
)
_hyper = st.dictionaries(
    st.sampled_from(["n_epochs", "batch_size", "learning_rate_multiplier", "beta", "warmup"]),
    _json,
    max_size=4,
)
_options = st.one_of(_json, st.fixed_dictionaries({}, optional={"hyperparameters": _hyper}))
_requests = st.fixed_dictionaries(
    {},
    optional={
        "method": st.one_of(
            _json,
            st.fixed_dictionaries(
                {},
                optional={
                    "type": st.one_of(st.sampled_from(["supervised", "dpo"]), _json),
                    "supervised": _options,
                    "dpo": _options,
                },
            ),
        ),
        "hyperparameters": st.one_of(_hyper, _json),
        "seed": _json,
        "suffix": _json,
        "metadata": _json,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests)
def test_any_create_request_is_a_valid_job_or_a_bad_request(request_fields: dict[str, Any]) -> None:
    """Whatever JSON a tenant sends, the answer is a 400 or a job the API models accept, and
    reads back in OpenAI's shape: never a server error."""
    try:
        made = manifest(**request_fields)
    except ApiError as refused:
        assert refused.status == 400 and refused.message
        return
    FineTuneJobSpec.model_validate(made["spec"])
    made["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    assert mapping.openai_job(made, TEMPLATE)["status"] == "validating_files"


def test_a_dpo_request_becomes_a_dpo_job_and_reads_back_as_one() -> None:
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}
    made = manifest(method=dpo)
    assert made["spec"]["method"] == {"type": "dpo", "dpo": {"beta": 0.25}}
    assert made["spec"]["training"]["epochs"] == 2
    made["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    shown = mapping.openai_job(made, TEMPLATE)
    assert shown["method"]["type"] == "dpo"
    assert shown["method"]["dpo"]["hyperparameters"]["beta"] == 0.25
    assert shown["method"]["dpo"]["hyperparameters"]["n_epochs"] == 2
    # beta "auto" leaves TRL's default, and shows it.
    auto = mapping.openai_job(
        {**manifest(method={"type": "dpo"}), "metadata": made["metadata"]}, TEMPLATE
    )
    assert auto["method"]["dpo"]["hyperparameters"]["beta"] == 0.1


def test_a_validation_file_is_the_jobs_evaluation_data_in_place_of_the_templates() -> None:
    made = job_manifest(
        "ftjob-1", "team-a",
        {"model": "tiny", "training_file": "file-1", "validation_file": "file-2"},
        model_uri="pvc://work/model", dataset_uri=URL, template={"dataset": {"evalFraction": 0.1}},
        output_uri="pvc://work/adapters/ftjob-1", eval_uri=URL + "&v",
    )  # fmt: skip
    assert made["spec"]["dataset"] == {"uri": URL, "format": "auto", "evalUri": URL + "&v"}
    made["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    assert mapping.openai_job(made, {})["validation_file"] == "file-2"


def test_a_spec_the_api_models_refuse_is_a_bad_request() -> None:
    with pytest.raises(ApiError, match="training"):
        manifest(hyperparameters={"batch_size": 100_000})


@pytest.mark.parametrize(
    ("phase", "status"),
    [(None, "validating_files"), ("Pending", "validating_files"),
     ("Validating", "validating_files"), ("Queued", "queued"), ("Running", "running"),
     ("Suspended", "paused"), ("Succeeded", "succeeded"), ("Failed", "failed")],
)  # fmt: skip
def test_phases_map_to_openai_statuses(phase: str | None, status: str) -> None:
    shown = job(phase)
    shown["spec"]["runPolicy"] = {"suspend": phase == "Suspended"}
    assert mapping.openai_status(shown) == status


def test_pause_and_resume_show_before_the_operator_acts() -> None:
    pausing = job("Running")
    pausing["spec"]["runPolicy"] = {"suspend": True}
    assert mapping.openai_status(pausing) == "paused"
    resuming = job("Suspended")
    resuming["spec"]["runPolicy"] = {"suspend": False}
    assert mapping.openai_status(resuming) == "queued"


def test_a_cancelled_job_is_cancelled_until_it_had_finished() -> None:
    cancelled = job("Suspended")
    cancelled["metadata"]["annotations"][mapping.CANCELLED] = "2026-01-01T00:01:00Z"
    assert mapping.openai_status(cancelled) == "cancelled"
    assert mapping.openai_job(cancelled, TEMPLATE)["finished_at"] == 1767225660
    finished = copy.deepcopy(cancelled)
    finished["status"]["phase"] = "Succeeded"
    assert mapping.openai_status(finished) == "succeeded"


def test_a_succeeded_job_names_its_adapter_and_counts_its_tokens() -> None:
    done = job(
        "Succeeded", completionTime="2026-01-01T00:10:00Z",
        estimate={"examples": 64, "tokens": 1000, "sequences": 64, "steps": 20},
        progress={"step": 10, "loss": 0.5, "updatedAt": "2026-01-01T00:09:59Z"},
        result={"outcome": "Succeeded", "reason": "Succeeded",
                "adapter": {"uri": "pvc://work/adapters/ftjob-1", "sha256": "ab", "sizeBytes": 1}},
    )  # fmt: skip
    shown = mapping.openai_job(done, TEMPLATE)
    assert shown["status"] == "succeeded"
    assert shown["fine_tuned_model"] == "ft:tiny:team-a:s:ftjob-1"
    assert mapping.job_of_model(shown["fine_tuned_model"]) == "ftjob-1"
    assert shown["trained_tokens"] == 500  # half an epoch's 20 steps
    assert shown["finished_at"] == 1767226200 and shown["error"] is None
    assert shown["hyperparameters"] == {
        "batch_size": 4, "learning_rate_multiplier": 1.0, "n_epochs": None,
    }  # fmt: skip
    [checkpoint] = mapping.job_checkpoints(done)
    assert checkpoint["step_number"] == 10
    assert checkpoint["fine_tuned_model_checkpoint"] == shown["fine_tuned_model"]


def test_a_failure_becomes_an_error_with_the_param_at_fault() -> None:
    failed = job(
        "Failed",
        conditions=[{"type": "Failed", "status": "True", "reason": "DatasetError",
                     "message": "line 3: not JSON", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    )  # fmt: skip
    shown = mapping.openai_job(failed, TEMPLATE)
    assert shown["error"] == {
        "code": "DatasetError", "message": "line 3: not JSON", "param": "training_file",
    }  # fmt: skip
    assert shown["fine_tuned_model"] is None


def test_a_running_job_estimates_its_finish_from_progress() -> None:
    running = job("Running", progress={"step": 3, "etaSeconds": 60,
                                       "updatedAt": "2026-01-01T00:00:00Z"})  # fmt: skip
    assert mapping.openai_job(running, TEMPLATE)["estimated_finish"] == 1767225660


def kube_event(
    uid: str, reason: str, message: str, last: str, exact: str | None = None
) -> dict[str, Any]:
    """A core/v1 Event of the operator's on the job: ``last`` its lastTimestamp, ``exact`` its
    eventTime (to the microsecond) when it has one."""
    event = {"metadata": {"uid": uid}, "type": "Normal", "reason": reason, "message": message,
             "lastTimestamp": last}  # fmt: skip
    return event if exact is None else {**event, "eventTime": exact}


def test_events_come_newest_first_from_creation_kube_events_progress_and_the_end() -> None:
    done = job(
        "Succeeded", completionTime="2026-01-01T00:10:00Z",
        progress={"step": 10, "totalSteps": 10, "loss": 0.5, "updatedAt": "2026-01-01T00:09:00Z"},
    )  # fmt: skip
    kube_events = [kube_event("u1", "Running", "trainer started", "2026-01-01T00:05:00Z")]
    events = mapping.job_events(done, kube_events)
    assert [e["message"] for e in events] == [
        "The job has successfully completed",
        "Step 10/10: training loss=0.5",
        "Running: trainer started",
        "Created fine-tuning job",
    ]
    assert events[1]["type"] == "metrics" and events[1]["data"]["train_loss"] == 0.5


def test_the_end_is_the_newest_event_though_the_operators_event_for_it_is_a_second_later() -> None:
    done = job("Succeeded", completionTime="2026-01-01T00:10:00Z")
    kube_events = [kube_event("u1", "Succeeded", "the trainer finished", "2026-01-01T00:10:01Z")]
    events = mapping.job_events(done, kube_events)
    assert [e["message"] for e in events] == [
        "The job has successfully completed",
        "Succeeded: the trainer finished",
        "Created fine-tuning job",
    ]
    assert events[0]["created_at"] == events[1]["created_at"]


def test_the_operators_events_of_one_second_order_by_their_microseconds() -> None:
    done = job("Succeeded", completionTime="2026-01-01T00:10:00Z")
    second = "2026-01-01T00:10:00"
    # Listed as the apiserver may list them (by their generated names), not as they happened.
    kube_events = [
        kube_event("u2", "Succeeded", "m", f"{second}Z", exact=f"{second}.900000Z"),
        kube_event("u1", "Running", "m", f"{second}Z", exact=f"{second}.100000Z"),
    ]
    messages = [e["message"] for e in mapping.job_events(done, kube_events)]
    assert messages == [
        "The job has successfully completed", "Succeeded: m", "Running: m", "Created fine-tuning job",
    ]  # fmt: skip


def test_events_of_the_same_second_keep_the_order_they_happened_in() -> None:
    cancelled = job("Running")
    cancelled["metadata"]["annotations"][mapping.CANCELLED] = "2026-01-01T00:00:00Z"
    messages = [e["message"] for e in mapping.job_events(cancelled, [])]
    assert messages == ["The job was cancelled", "Created fine-tuning job"]


def test_pages_follow_after_and_say_whether_more_follow() -> None:
    items = [str(i) for i in range(10)]
    first, more = mapping.page(items, None, 4, str)
    assert (first, more) == (["0", "1", "2", "3"], True)
    last, more = mapping.page(items, "7", 4, str)
    assert (last, more) == (["8", "9"], False)
    with pytest.raises(ApiError):
        mapping.page(items, "missing", 4, str)
    with pytest.raises(ApiError):
        mapping.page(items, None, 0, str)


def test_a_kubectl_jobs_dataset_uri_is_shown_without_its_credentials() -> None:
    made = job("Running")
    del made["metadata"]["annotations"][mapping.TRAINING_FILE]
    made["spec"]["dataset"]["uri"] = "https://user:secret@data.example/train.jsonl?sig=abc"
    shown = mapping.openai_job(made, TEMPLATE)["training_file"]
    assert "secret" not in shown and "sig" not in shown


def test_a_succeeded_jobs_curves_are_its_result_file() -> None:
    done = job(
        "Succeeded",
        progress={"step": 2, "history": [
            {"step": 1, "loss": 2.5, "learningRate": 0.01},
            {"step": 2, "loss": 1.5, "learningRate": 0.01, "tokensPerSecond": 100.0},
        ]},
    )  # fmt: skip
    assert mapping.openai_job(done, TEMPLATE)["result_files"] == ["file-result-ftjob-1"]
    assert mapping.result_csv(done) == (
        "step,train_loss,learning_rate,tokens_per_second\n1,2.5,0.01,\n2,1.5,0.01,100.0\n"
    )
    assert mapping.openai_job(job("Running"), TEMPLATE)["result_files"] == []


def test_a_refusal_by_an_admission_policy_says_which_field_and_rbacs_never_names_the_caller() -> (
    None
):
    import httpx

    from kubetune.server.kube import _api_error

    policy = httpx.Response(403, json={"message": (
        'finetunejobs.kubetune.io "ftjob-1" is forbidden: ValidatingAdmissionPolicy '
        "'kubetune-references' with binding 'kubetune-references' denied request: "
        "spec.model.uri: you may not get PersistentVolumeClaim models in namespace team-a"
    )})  # fmt: skip
    refused = _api_error(policy, "create", "fine-tuning jobs")
    assert (refused.status, refused.message) == (
        403, "spec.model.uri: you may not get PersistentVolumeClaim models in namespace team-a")  # fmt: skip
    rbac = httpx.Response(403, json={"message": (
        'finetunejobs.kubetune.io is forbidden: User "system:serviceaccount:team-a:bob" cannot '
        'create resource "finetunejobs" in API group "kubetune.io" in the namespace "team-a"'
    )})  # fmt: skip
    hidden = _api_error(rbac, "create", "fine-tuning jobs")
    assert hidden.status == 403 and "bob" not in hidden.message


@pytest.mark.parametrize(
    "annotations",
    [
        {mapping.CANCELLED: "yesterday"},
        {mapping.METADATA: "{not json"},
        {mapping.METADATA: "[" * 5000},
        {mapping.METADATA: '{"team": 1}'},
    ],
)
def test_annotations_edited_with_kubectl_read_back_without_them(
    annotations: dict[str, str],
) -> None:
    # Anyone who may edit the job may write these; each was a 500 for the namespace's list.
    edited = job("Running")
    edited["metadata"]["annotations"].update(annotations)
    shown = mapping.openai_job(edited, TEMPLATE)
    assert shown["metadata"] is None
    assert shown["finished_at"] is None
