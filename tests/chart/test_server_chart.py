"""The chart's kubetune-server (server.enabled): off by default; when on, a Deployment that runs
non-root on a read-only root whose own identity may only read FineTuneJobs (the reads cache) or,
with the cache off, nothing at all; a Service, a claim for uploads and the URL-signing Secret;
its values checked by the schema."""

from __future__ import annotations

import json

import pytest
from chartkit import CHART, Helm, Render, of_kind

pytestmark = pytest.mark.unit


def server_objects(objects: list[dict]) -> list[dict]:
    return [
        o for o in objects
        if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "server"
    ]  # fmt: skip


def test_the_server_is_off_by_default(render: Render) -> None:
    assert server_objects(render()) == []


def test_the_server_runs_locked_down_with_no_identity_of_its_own(render: Render) -> None:
    objects = render(
        "--set", "server.enabled=true", "--set", "server.models.tiny=pvc://work/model",
        "--set", "server.defaultNamespace=team-a", "--set", "server.cache.enabled=false",
    )  # fmt: skip
    mine = server_objects(objects)
    assert sorted(o["kind"] for o in mine) == [
        "Deployment", "PersistentVolumeClaim", "Secret", "Service", "ServiceAccount",
    ]  # fmt: skip
    [deployment] = of_kind(mine, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["kubetune-server"]
    assert pod["automountServiceAccountToken"] is False
    [account] = of_kind(mine, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert json.loads(env["KUBETUNE_SERVER_MODELS"]) == {"tiny": "pvc://work/model"}
    assert env["KUBETUNE_SERVER_DEFAULT_NAMESPACE"] == "team-a"
    assert env["KUBETUNE_SERVER_DATASET_BASE_URL"] == (
        "http://kt-kubetune-server.kubetune-system.svc:8080"
    )
    # No Role or ClusterRole is bound to the server's account: it acts with callers' tokens.
    name = account["metadata"]["name"]
    for binding in of_kind(objects, "RoleBinding") + of_kind(objects, "ClusterRoleBinding"):
        assert all(s.get("name") != name for s in binding.get("subjects") or []), binding


def test_the_reads_cache_gives_the_server_read_only_finetunejobs_and_nothing_else(
    render: Render,
) -> None:
    mine = server_objects(
        render("--set", "server.enabled=true", "--set", "server.cache.enabled=true")
    )
    [account] = of_kind(mine, "ServiceAccount")
    [role] = of_kind(mine, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"],
         "verbs": ["get", "list", "watch"]},
    ]  # fmt: skip
    [binding] = of_kind(mine, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"],
         "namespace": account["metadata"]["namespace"]},
    ]  # fmt: skip
    assert of_kind(mine, "Role") == [] and of_kind(mine, "RoleBinding") == []
    pod = of_kind(mine, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False  # only the projected token below
    volumes = {v["name"]: v for v in pod["volumes"]}
    [source] = volumes["identity"]["projected"]["sources"]
    assert source["serviceAccountToken"]["path"] == "token"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["KUBETUNE_SERVER_CACHE_TOKEN_FILE"] == "/var/run/secrets/kubetune-server/token"
    assert (env["KUBETUNE_SERVER_ACCESS_ALLOWED_TTL_SECONDS"],
            env["KUBETUNE_SERVER_ACCESS_DENIED_TTL_SECONDS"]) == ("10", "5")  # fmt: skip


def test_an_existing_claim_and_secret_are_used_as_they_are(render: Render) -> None:
    mine = server_objects(render(
        "--set", "server.enabled=true", "--set", "server.storage.existingClaim=uploads",
        "--set", "server.signingKeySecret=signing", "--set", "server.cache.enabled=false",
    ))  # fmt: skip
    assert sorted(o["kind"] for o in mine) == ["Deployment", "Service", "ServiceAccount"]
    volumes = {
        v["name"]: v for v in of_kind(mine, "Deployment")[0]["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["files"]["persistentVolumeClaim"]["claimName"] == "uploads"
    assert volumes["signing"]["secret"]["secretName"] == "signing"


def test_the_schema_refuses_unknown_server_values(helm: Helm) -> None:
    result = helm("template", "kt", str(CHART), "--set", "server.enabeld=true")
    assert result.returncode != 0
    assert "enabeld" in result.stderr


def test_the_console_settings_reach_the_server(render: Render) -> None:
    mine = server_objects(render(
        "--set", "server.enabled=true",
        "--set", "server.console.tokenHeader=X-Forwarded-Access-Token",
        "--set", "server.console.namespaces={team-a,team-b}",
    ))  # fmt: skip
    [container] = of_kind(mine, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_SERVER_CONSOLE"] == "true"
    assert env["KUBETUNE_SERVER_CONSOLE_TOKEN_HEADER"] == "X-Forwarded-Access-Token"
    assert json.loads(env["KUBETUNE_SERVER_CONSOLE_NAMESPACES"]) == ["team-a", "team-b"]


def test_the_console_is_on_with_the_login_page_only_by_default(render: Render) -> None:
    mine = server_objects(render("--set", "server.enabled=true"))
    [container] = of_kind(mine, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    names = {e["name"] for e in container["env"]}
    assert "KUBETUNE_SERVER_CONSOLE_TOKEN_HEADER" not in names
