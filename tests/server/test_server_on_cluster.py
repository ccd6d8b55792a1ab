"""kubetune-server on the real local control plane, driven through the real openai SDK with real
ServiceAccount tokens: what a data scientist sees, and what the FineTuneJobs underneath show."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from serverkit import (
    BASE_MODEL,
    CLAIM,
    ServerProcess,
    Tenant,
    ftj,
    make_tenant,
    poll_until,
    work_claim,
)

from kubetune_devtools.pytest_plugin import (
    Kubectl,
    apply,
    create_namespace,
    minimal_finetunejob,
    wait_for,
)
from kubetune_devtools.tiny import toy_preference_records, write_jsonl

pytestmark = pytest.mark.integration


@pytest.fixture
def alice(kubectl: Kubectl, namespace: str) -> Tenant:
    return make_tenant(kubectl, namespace, "alice")


@pytest.fixture
def mallory(kubectl: Kubectl, namespace: str) -> Any:
    """A second user: a tenant of a namespace of their own, with no rights in alice's."""
    own = create_namespace(kubectl, f"{namespace[:50]}-other")
    yield make_tenant(kubectl, own, "mallory")
    kubectl("delete", "namespace", own, "--wait=false", check=False)


def upload(client: openai.OpenAI, path: Path) -> Any:
    with path.open("rb") as handle:
        return client.files.create(file=(path.name, handle), purpose="fine-tune")


def test_a_jsonl_upload_trains_to_an_adapter_named_by_fine_tuned_model(
    server: ServerProcess, kubectl: Kubectl, alice: Tenant, tiny_assets: Path
) -> None:
    volume = work_claim(kubectl, alice.namespace, model=tiny_assets / "model")
    client = server.client(alice.token, alice.namespace)
    dataset = tiny_assets / "data" / "reverse-prompt-completion.jsonl"

    uploaded = upload(client, dataset)
    assert uploaded.purpose == "fine-tune"
    assert uploaded.bytes == dataset.stat().st_size
    assert client.files.retrieve(uploaded.id).filename == dataset.name
    assert client.files.content(uploaded.id).read() == dataset.read_bytes()
    assert [f.id for f in client.files.list()] == [uploaded.id]

    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL, training_file=uploaded.id, suffix="reverse", seed=7,
        hyperparameters={"n_epochs": "auto", "batch_size": 4, "learning_rate_multiplier": "auto"},
        metadata={"team": "support"},
    )  # fmt: skip
    assert job.status == "validating_files"
    assert job.training_file == uploaded.id and job.model == BASE_MODEL and job.seed == 7
    assert job.metadata == {"team": "support"}
    # Underneath, a FineTuneJob made with alice's token.
    spec = ftj(kubectl, alice.namespace, job.id)["spec"]
    assert spec["model"]["uri"] == f"pvc://{CLAIM}/model"
    assert spec["training"]["seed"] == 7 and spec["training"]["batchSize"] == 4

    seen_statuses: set[str] = set()

    def observe() -> tuple[Any, ...]:
        current = client.fine_tuning.jobs.retrieve(job.id)
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        seen_statuses.add(current.status)
        metrics = [e for e in events if e.type == "metrics"]
        return (current.status, len(events), metrics[0].data["step"] if metrics else None)

    status, *_ = poll_until(
        observe, lambda seen: seen[0] in ("succeeded", "failed", "cancelled"), 180,
        f"job {job.id} to finish",
    )  # fmt: skip
    finished = client.fine_tuning.jobs.retrieve(job.id)
    assert status == "succeeded", finished.error
    assert "running" in seen_statuses
    assert finished.error is None and finished.finished_at
    assert finished.trained_tokens
    assert finished.fine_tuned_model == f"ft:{BASE_MODEL}:{alice.namespace}:reverse:{job.id}"

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed"
    assert messages[-1] == "Created fine-tuning job"
    assert any(e.type == "metrics" and e.data["train_loss"] is not None for e in events)
    [results] = finished.result_files
    assert client.files.retrieve(results).purpose == "fine-tune-results"
    curves = client.files.content(results).text.splitlines()
    assert curves[0] == "step,train_loss,learning_rate,tokens_per_second"
    assert len(curves) > 1
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [finished.fine_tuned_model]

    # The adapter fine_tuned_model names exists, with the digest the FineTuneJob's status holds.
    model = client.models.retrieve(finished.fine_tuned_model)
    assert model.id == finished.fine_tuned_model
    assert finished.fine_tuned_model in [m.id for m in client.models.list()]
    adapter = ftj(kubectl, alice.namespace, job.id)["status"]["result"]["adapter"]
    assert (
        model.model_extra is not None
        and model.model_extra["adapter"]["sha256"] == adapter["sha256"]
    )
    local = volume / adapter["uri"].removeprefix(f"pvc://{CLAIM}/")
    weights = local / "adapter_model.safetensors" if local.is_dir() else local
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == adapter["sha256"]


def test_openais_dpo_pairs_and_a_validation_file_train_a_dpo_job_evaluated_on_that_file(
    server: ServerProcess, kubectl: Kubectl, alice: Tenant, tiny_assets: Path, tmp_path: Path
) -> None:
    work_claim(kubectl, alice.namespace, model=tiny_assets / "model")
    client = server.client(alice.token, alice.namespace)
    pairs = upload(client, write_jsonl(tmp_path / "pairs.jsonl",
                                       toy_preference_records("openai-preference", 64)))  # fmt: skip
    held = upload(client, write_jsonl(tmp_path / "held.jsonl",
                                      toy_preference_records("openai-preference", 16, seed=7)))  # fmt: skip
    supervised = upload(client, tiny_assets / "data" / "reverse-prompt-completion.jsonl")
    # Pairs are for dpo, records for supervised: the mismatch is refused naming the file.
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=pairs.id)
    assert refused.value.body["param"] == "training_file"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(
            model=BASE_MODEL, training_file=pairs.id, validation_file=supervised.id,
            method={"type": "dpo"},
        )  # fmt: skip
    assert refused.value.body["param"] == "validation_file"  # type: ignore[index]

    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL, training_file=pairs.id, validation_file=held.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
    )  # fmt: skip
    assert job.method is not None and job.method.type == "dpo"
    assert job.validation_file == held.id
    spec = ftj(kubectl, alice.namespace, job.id)["spec"]
    assert (spec["method"]["type"], spec["method"]["dpo"]["beta"]) == ("dpo", 0.2)
    assert spec["dataset"]["evalUri"].startswith(spec["dataset"]["uri"].split("/datasets/")[0])

    poll_until(
        lambda: client.fine_tuning.jobs.retrieve(job.id).status,
        lambda status: status in ("succeeded", "failed", "cancelled"), 240,
        f"job {job.id} to finish",
    )  # fmt: skip
    finished = client.fine_tuning.jobs.retrieve(job.id)
    assert finished.status == "succeeded", finished.error
    # The held-out pairs were what the run evaluated on: TRL's preference metrics over them.
    status = ftj(kubectl, alice.namespace, job.id)["status"]
    assert status["estimate"]["examples"] == 64, status["estimate"]
    assert "eval_reward_accuracy" in status["result"]["metrics"], status["result"]["metrics"]
    assert finished.method is not None and finished.method.dpo is not None
    assert finished.method.dpo.hyperparameters is not None
    assert finished.method.dpo.hyperparameters.beta == 0.2


def test_a_malformed_file_is_refused_at_upload_naming_the_line(
    server: ServerProcess, alice: Tenant, tmp_path: Path
) -> None:
    client = server.client(alice.token, alice.namespace)
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "abc", "completion": "cba"})
    bad.write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    with pytest.raises(openai.BadRequestError) as refused:
        upload(client, bad)
    assert "line 3" in refused.value.message
    assert refused.value.code == "invalid_file"

    missing = tmp_path / "missing.jsonl"
    missing.write_text(f"{good}\n" + json.dumps({"prompt": "abc"}) + "\n")
    with pytest.raises(openai.BadRequestError, match="line 2"):
        upload(client, missing)
    assert client.files.list().data == []


def test_a_second_user_is_denied_and_sees_none_of_the_first_users_files_or_jobs(
    server: ServerProcess, kubectl: Kubectl, alice: Tenant, mallory: Tenant, tiny_assets: Path
) -> None:
    mine = server.client(alice.token, alice.namespace)
    uploaded = upload(mine, tiny_assets / "data" / "reverse-prompt-completion.jsonl")
    apply(kubectl, alice.namespace, minimal_finetunejob("held", runPolicy={"suspend": True}))

    intruder = server.client(mallory.token, alice.namespace)
    for attempt in (
        intruder.files.list, intruder.fine_tuning.jobs.list,
        lambda: intruder.files.retrieve(uploaded.id),
        lambda: intruder.files.content(uploaded.id),
        lambda: intruder.files.delete(uploaded.id),
        lambda: intruder.fine_tuning.jobs.retrieve("held"),
        lambda: intruder.fine_tuning.jobs.cancel("held"),
        lambda: intruder.fine_tuning.jobs.create(model=BASE_MODEL, training_file=uploaded.id),
    ):  # fmt: skip
        with pytest.raises(openai.PermissionDeniedError):
            attempt()

    # In their own project they see nothing of alice's.
    own = server.client(mallory.token, mallory.namespace)
    assert own.files.list().data == []
    assert own.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.NotFoundError):
        own.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        own.fine_tuning.jobs.retrieve("held")
    assert [m.id for m in own.models.list()] == [BASE_MODEL]
    # alice's things are untouched.
    assert [f.id for f in mine.files.list()] == [uploaded.id]
    assert ftj(kubectl, alice.namespace, "held")["spec"]["runPolicy"]["suspend"] is True

    # A token the API server doesn't accept, or none: 401, in OpenAI's error shape.
    with pytest.raises(openai.AuthenticationError):
        server.client("not-a-token", alice.namespace).files.list()
    request = urllib.request.Request(f"{server.url}/v1/files", headers={"OpenAI-Project": "a"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    assert json.loads(refused.value.read())["error"]["code"] == "invalid_api_key"


def test_cancel_pause_and_resume(
    server: ServerProcess, kubectl: Kubectl, alice: Tenant, tiny_assets: Path
) -> None:
    work_claim(kubectl, alice.namespace, model=tiny_assets / "model")
    client = server.client(alice.token, alice.namespace)
    uploaded = upload(client, tiny_assets / "data" / "reverse-prompt-completion.jsonl")
    job = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=uploaded.id)

    paused = client.fine_tuning.jobs.pause(job.id)
    assert ftj(kubectl, alice.namespace, job.id)["spec"]["runPolicy"]["suspend"] is True

    def phase() -> tuple[Any, ...]:
        return (ftj(kubectl, alice.namespace, job.id).get("status", {}).get("phase"),)

    poll_until(phase, lambda seen: seen[0] == "Suspended", 60, "the job to be suspended")
    # The operator's status change reaches the server's cache through its watch.
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "paused", 30, "paused")
    assert paused.id == job.id

    resumed = client.fine_tuning.jobs.resume(job.id)
    assert ftj(kubectl, alice.namespace, job.id)["spec"]["runPolicy"]["suspend"] is False
    assert resumed.status == "queued"
    poll_until(phase, lambda seen: seen[0] != "Suspended", 60, "the job to leave Suspended")

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert ftj(kubectl, alice.namespace, job.id)["spec"]["runPolicy"]["suspend"] is True
    events = client.fine_tuning.jobs.list_events(job.id).data
    # The operator's own Event of the suspension may come in the same second or after.
    assert "The job was cancelled" in [e.message for e in events]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


def test_pagination_over_sixty_jobs_returns_each_exactly_once(
    server: ServerProcess, kubectl: Kubectl, alice: Tenant
) -> None:
    names = [f"held-{i:02d}" for i in range(60)]
    jobs = [
        minimal_finetunejob(name, runPolicy={"suspend": True}, validation={"enabled": False})
        for name in names
    ]
    apply(kubectl, alice.namespace, *jobs)
    client = server.client(alice.token, alice.namespace)
    # Jobs made with kubectl reach the server's cache through its watch.
    wait_for(lambda: len(client.fine_tuning.jobs.list(limit=100).data) == 60, 30, "60 jobs")

    listed = [job.id for job in client.fine_tuning.jobs.list(limit=7)]  # the SDK follows `after`
    assert sorted(listed) == names
    first = client.fine_tuning.jobs.list(limit=60)
    assert [j.id for j in first.data] == listed and not first.has_more
    page = client.fine_tuning.jobs.list(limit=59)
    assert page.has_more and len(page.data) == 59


def test_reads_follow_the_watch_and_a_revoked_user_loses_them_within_the_allowed_ttl(
    server: ServerProcess, kubectl: Kubectl, alice: Tenant, mallory: Tenant
) -> None:
    """Reads come from the server's watch-backed cache behind each caller's own (cached) access
    review: a change made with kubectl shows; a user whose RoleBinding is deleted loses list and
    retrieve within the allowed TTL (10 s by default); another namespace's job of the same name
    never shows."""
    apply(kubectl, alice.namespace, minimal_finetunejob("shared-name", runPolicy={"suspend": True}))
    apply(
        kubectl, mallory.namespace, minimal_finetunejob("shared-name", runPolicy={"suspend": True})
    )
    carol = make_tenant(kubectl, alice.namespace, "carol")
    client = server.client(carol.token, alice.namespace)
    wait_for(lambda: [j.id for j in client.fine_tuning.jobs.list().data] == ["shared-name"], 30,
             "the job in carol's list")  # fmt: skip

    metadata = json.dumps({"team": "blue"})
    kubectl("annotate", "ftj", "shared-name", "-n", alice.namespace,
            f"openai.kubetune.io/metadata={metadata}")  # fmt: skip
    wait_for(lambda: client.fine_tuning.jobs.retrieve("shared-name").metadata == {"team": "blue"},
             30, "the annotation through the watch")  # fmt: skip
    # mallory's job of the same name, in mallory's namespace, is not carol's.
    assert [j.metadata for j in server.client(mallory.token, mallory.namespace)
            .fine_tuning.jobs.list().data] == [None]  # fmt: skip

    kubectl("delete", "rolebinding", "carol-tenant", "-n", alice.namespace)

    def denied() -> bool:
        try:
            client.fine_tuning.jobs.retrieve("shared-name")
        except openai.PermissionDeniedError:
            return True
        return False

    # The allowed TTL (10 s) plus the API server's own RBAC propagation: never the cache's
    # answer for longer.
    wait_for(denied, 10 + 20, "carol's retrieve to be refused", interval=1)
    with pytest.raises(openai.PermissionDeniedError):
        client.fine_tuning.jobs.list()
    assert [j.id for j in server.client(alice.token, alice.namespace)
            .fine_tuning.jobs.list().data] == ["shared-name"]  # fmt: skip
