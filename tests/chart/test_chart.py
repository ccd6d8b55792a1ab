"""The Helm chart, rendered by the real helm: lint, modes, least-privilege RBAC, values schema."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import CHART, CI_VALUES, Helm, Render, of_kind, settings_from

from kubetune.api.models import FineTuneJobSpec
from kubetune.operator.render import render as render_children
from kubetune.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

# Everything the operator may ever do, per (apiGroup, resource). A rule that grants anything else,
# or a wildcard, fails the test: widening the operator's rights is a reviewed change here.
OPERATOR_ALLOW_LIST: dict[tuple[str, str], set[str]] = {
    ("kubetune.io", "finetunejobs"): {"get", "list", "watch", "patch", "delete"},
    ("kubetune.io", "finetunejobs/status"): {"get", "patch"},
    ("kubetune.io", "finetunejobs/finalizers"): {"update"},
    ("", "events"): {"create"},
    # update: a companion made first by someone else gets the rendered content written over it.
    # No serviceaccounts, roles or rolebindings: nothing is made per job for the trainer.
    ("", "configmaps"): {"get", "create", "update", "delete"},
    # A multi-pod group's headless Service (its pods' DNS subdomain).
    ("", "services"): {"get", "create", "update", "delete"},
    # list, watch: one deleted or changed is put back while a job there is unfinished.
    ("networking.k8s.io", "networkpolicies"): {
        "get",
        "list",
        "watch",
        "create",
        "update",
        "delete",
    },
    # delete: a multi-pod group's failed attempt is replaced by a new Job.
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    # operator.groupWorkload: jobset only; never deleted (JobSet restarts the group itself).
    ("jobset.x-k8s.io", "jobsets"): {"get", "list", "watch", "create", "patch"},
    ("", "pods"): {"list", "watch"},
    ("", "persistentvolumeclaims"): {"get"},
    # A queued job's runPolicy.suspend deactivates its Job's Workload (Kueue's way to stop a Job).
    ("kueue.x-k8s.io", "workloads"): {"list", "patch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    # Leader election between replicas (a Role in the release namespace only).
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
    # /metrics for callers the API vouches for: whose a token is, and whether it may read them.
    ("authentication.k8s.io", "tokenreviews"): {"create"},
    ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
}
# What namespace users get through the built-in view/edit/admin roles.
USER_ALLOW_LIST: dict[tuple[str, str], set[str]] = {
    ("kubetune.io", "finetunejobs"): {
        "get", "list", "watch", "create", "update", "patch", "delete", "deletecollection",
    },
    ("kubetune.io", "finetunejobs/status"): {"get", "list", "watch"},
}  # fmt: skip
AGGREGATION = "rbac.authorization.k8s.io/aggregate-to-"


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples a list of PolicyRules grants."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def outside(rules: list[dict[str, Any]], allow: dict[tuple[str, str], set[str]]) -> set[Any]:
    return {g for g in grants(rules) if g[2] not in allow.get((g[0], g[1]), set())}


def wildcards(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fields = ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs")
    return [r for r in rules if any("*" in str(v) for f in fields for v in r.get(f, []))]


def operator_roles(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The (Cluster)Roles bound to a ServiceAccount of the chart's: the operator's rights."""
    bound = {
        (b["roleRef"]["kind"], b["roleRef"]["name"]) for b in objects
        if b["kind"] in ("ClusterRoleBinding", "RoleBinding")
        and any(s["kind"] == "ServiceAccount" for s in b["subjects"])
    }  # fmt: skip
    return [o for o in objects if (o["kind"], o["metadata"]["name"]) in bound]


def deployment_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    [deployment] = of_kind(objects, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.stem if v else "defaults")
def test_helm_lint_is_clean(helm: Helm, values: Path | None) -> None:
    args = ["-f", str(values)] if values else []
    result = helm("lint", "--strict", str(CHART), *args)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda v: v.stem)
def test_every_values_file_renders_labelled_objects(render: Render, values: Path) -> None:
    objects = render("-f", str(values))

    assert {"Deployment", "ServiceAccount", "ClusterRole"} <= {o["kind"] for o in objects}
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kubetune", obj["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == "kt"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "kubetune"


def test_all_namespaces_mode_binds_a_cluster_role_and_creates_no_roles(render: Render) -> None:
    objects = render("-f", str(CHART / "ci" / "all-namespaces-values.yaml"))

    bindings = {b["roleRef"]["name"] for b in of_kind(objects, "ClusterRoleBinding")}
    # metrics-auth: the TokenReviews and SubjectAccessReviews of /metrics callers (metrics.auth);
    # progress-review: the TokenReviews of the trainers' progress tokens.
    assert bindings == {"kt-kubetune-operator", "kt-kubetune-crd-watch", "kt-kubetune-metrics-auth",
                        "kt-kubetune-progress-review"}  # fmt: skip
    # Only the leader-election Role (its Lease, in the release namespace).
    assert [r["metadata"]["name"] for r in of_kind(objects, "Role")] == [
        "kt-kubetune-leader-election"
    ]
    assert [b["metadata"]["name"] for b in of_kind(objects, "RoleBinding")] == [
        "kt-kubetune-leader-election"
    ]
    assert deployment_env(objects)["KUBETUNE_NAMESPACES"] == ""


def test_watched_namespaces_get_one_role_each_and_nothing_cluster_wide_but_crd_watch_and_reviews(
    render: Render,
) -> None:
    objects = render("--set", "watchNamespaces={team-a,team-b}")

    roles = [r for r in of_kind(objects, "Role") if r["metadata"]["name"].endswith("-operator")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = [
        b for b in of_kind(objects, "RoleBinding") if b["metadata"]["name"].endswith("-operator")
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    # Besides the CRD watch, only the reviews of /metrics callers and of progress tokens, which
    # read no object.
    [binding] = [
        b for b in of_kind(objects, "ClusterRoleBinding") if not b["metadata"]["name"].endswith(
            ("-metrics-auth", "-progress-review"))
    ]  # fmt: skip
    [crd_watch] = [
        r
        for r in of_kind(objects, "ClusterRole")
        if r["metadata"]["name"] == binding["roleRef"]["name"]
    ]
    assert grants(crd_watch["rules"]) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    assert deployment_env(objects)["KUBETUNE_NAMESPACES"] == "team-a,team-b"


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda v: v.stem)
def test_operator_roles_grant_nothing_outside_the_allow_list(render: Render, values: Path) -> None:
    roles = operator_roles(render("-f", str(values)))

    assert roles
    for role in roles:
        assert wildcards(role["rules"]) == [], role["metadata"]["name"]
        assert outside(role["rules"], OPERATOR_ALLOW_LIST) == set(), role["metadata"]["name"]
        assert all("nonResourceURLs" not in rule for rule in role["rules"])
        # No RBAC escalation shortcuts: the operator holds what it grants instead.
        verbs = {verb for _, _, verb in grants(role["rules"])}
        assert not verbs & {"bind", "escalate", "impersonate"}


def test_aggregated_roles_give_users_view_and_edit_of_finetunejobs_only(render: Render) -> None:
    objects = render()
    aggregated = {
        o["metadata"]["name"]: o for o in of_kind(objects, "ClusterRole")
        if any(k.startswith(AGGREGATION) for k in o["metadata"]["labels"])
    }  # fmt: skip

    view, edit = aggregated["kt-kubetune-view"], aggregated["kt-kubetune-edit"]
    for level in ("view", "edit", "admin"):
        assert view["metadata"]["labels"][AGGREGATION + level] == "true"
    for level in ("edit", "admin"):
        assert edit["metadata"]["labels"][AGGREGATION + level] == "true"
    assert AGGREGATION + "view" not in edit["metadata"]["labels"]
    for role in (view, edit):
        assert wildcards(role["rules"]) == []
        assert outside(role["rules"], USER_ALLOW_LIST) == set()
    assert ("kubetune.io", "finetunejobs", "create") in grants(edit["rules"])
    assert not any(v in {"create", "patch", "delete"} for _, _, v in grants(view["rules"]))
    # Status is the operator's and the trainer's: no user role may write it.
    assert not any(r == "finetunejobs/status" and v != "get" and v not in {"list", "watch"}
                   for _, r, v in grants(edit["rules"] + view["rules"]))  # fmt: skip


def test_aggregation_can_be_turned_off(render: Render) -> None:
    objects = render("--set", "rbac.aggregateToDefaultRoles=false")

    assert not any(
        k.startswith(AGGREGATION) for o in objects for k in o["metadata"].get("labels", {})
    )


def test_operator_holds_everything_the_per_job_role_grants(render: Render) -> None:
    """The apiserver lets the operator create a Role only with rights it holds itself."""
    manifest = yaml.safe_load(
        (Path(__file__).parents[2] / "examples" / "tiny-cpu.yaml").read_text()
    )
    # Two pods: every child kind, the group's Service included.
    manifest["spec"]["resources"]["nodes"] = 2
    manifest["spec"]["training"]["microBatchSize"] = 8
    spec = FineTuneJobSpec.model_validate(manifest["spec"])
    children = render_children(spec, {"name": "tiny", "namespace": "ns", "uid": "u-1"},
                               OperatorSettings())  # fmt: skip
    [operator_role] = [
        r for r in operator_roles(render()) if r["metadata"]["name"].endswith("-operator")
    ]
    held = grants(operator_role["rules"])

    for role in of_kind(children, "Role"):
        assert grants(role["rules"]) <= held
    for child in children:
        group = child["apiVersion"].rpartition("/")[0]
        plural = {"ConfigMap": "configmaps", "ServiceAccount": "serviceaccounts", "Role": "roles",
                  "RoleBinding": "rolebindings", "Job": "jobs", "Service": "services",
                  "NetworkPolicy": "networkpolicies"}[child["kind"]]  # fmt: skip
        assert {(group, plural, "create"), (group, plural, "get")} <= held, child["kind"]


def test_operator_env_is_exactly_the_operator_settings(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = deployment_env(render("-f", str(CHART / "ci" / "watched-namespaces-values.yaml")))
    fields = {f"KUBETUNE_{name.upper()}" for name in OperatorSettings.model_fields}

    assert set(env) <= fields, set(env) - fields
    settings = settings_from(env, monkeypatch)

    assert settings.namespaces == ["team-a", "team-b"]
    assert settings.max_workers == 4
    assert settings.denied_options == ["trustRemoteCode", "pushToHub"]
    assert settings.progress_interval_seconds == 5
    assert settings.trainer_image == (
        "kubetune/trainer@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    assert settings.run_as_user is None and settings.fs_group is None
    assert settings.liveness_endpoint == "http://0.0.0.0:8080/healthz"
    assert settings.json_logs is True


def test_deployment_runs_restricted_with_probes_on_kopf_liveness(render: Render) -> None:
    [deployment] = of_kind(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]

    # Two replicas, one active through the Lease; a rollout never leaves none.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # /tmp for Python and kopf; the progress endpoint's certificate, read-only.
    assert {m["mountPath"] for m in container["volumeMounts"]} == {
        "/tmp", "/etc/kubetune/progress-tls"
    }  # fmt: skip
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["command"] == ["kubetune-operator"]
    assert container["image"] == "kubetune/operator:0.1.0"


def test_an_image_digest_wins_over_the_tag(render: Render) -> None:
    digest = "sha256:" + "ab" * 32
    objects = render("--set", f"image.digest={digest}", "--set", "image.tag=9.9.9",
                     "--set", "imageRegistry=registry.example.com/ml")  # fmt: skip
    [deployment] = of_kind(objects, "Deployment")

    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"registry.example.com/ml/kubetune/operator@{digest}"
    )
    assert deployment_env(objects)["KUBETUNE_TRAINER_IMAGE"] == (
        "registry.example.com/ml/kubetune/trainer:0.1.0"
    )


def test_networkpolicy_and_servicemonitor_render_only_when_enabled(render: Render) -> None:
    default = render()
    enabled = render("-f", str(CHART / "ci" / "networkpolicy-servicemonitor-values.yaml"))

    assert of_kind(default, "NetworkPolicy") == [] and of_kind(default, "ServiceMonitor") == []
    [policy] = of_kind(enabled, "NetworkPolicy")
    [monitor] = of_kind(enabled, "ServiceMonitor")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert {"ipBlock": {"cidr": "10.0.0.1/32"}} in policy["spec"]["egress"][1]["to"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # What the ServiceMonitor scrapes, the policy lets in.
    assert {"port": "metrics", "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]
    [service] = [
        s for s in of_kind(enabled, "Service") if s["metadata"]["name"].endswith("-metrics")
    ]
    assert service["spec"]["selector"] == monitor["spec"]["selector"]["matchLabels"]
    # Trainer pods reach the progress port: the token, not the address, says whose report it is.
    [progress] = [rule for rule in policy["spec"]["ingress"]
                  if {"port": "progress", "protocol": "TCP"} in rule["ports"]]  # fmt: skip
    assert progress["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "trainer"
    )


def test_trainers_report_to_the_progress_service_over_tls_with_the_charts_ca(
    render: Render,
) -> None:
    objects = render()
    env = deployment_env(objects)
    [service] = [
        s for s in of_kind(objects, "Service") if s["metadata"]["name"] == "kt-kubetune-progress"
    ]
    [secret] = [
        s for s in of_kind(objects, "Secret") if s["metadata"]["name"] == "kt-kubetune-progress-tls"
    ]
    assert (
        env["KUBETUNE_PROGRESS_URL"]
        == "https://kt-kubetune-progress.kubetune-system.svc:8443/v1/progress"
    )
    assert service["spec"]["ports"][0]["targetPort"] == "progress"
    assert secret["type"] == "kubernetes.io/tls"
    assert {"ca.crt", "tls.crt", "tls.key"} <= set(secret["data"])
    [deployment] = of_kind(objects, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    ca = next(e for e in container["env"] if e["name"] == "KUBETUNE_PROGRESS_CA_BUNDLE")
    assert ca["valueFrom"]["secretKeyRef"] == {"name": "kt-kubetune-progress-tls", "key": "ca.crt"}
    assert env["KUBETUNE_TRAINER_SERVICE_ACCOUNT"] == "default"
    # A host-network node (the local cluster's) reaches the operator on loopback instead.
    url = "https://127.0.0.1:9443/v1/progress"
    local = render("--set", f"progress.url={url}", "--set", "progress.tls.ipAddresses={127.0.0.1}")
    assert deployment_env(local)["KUBETUNE_PROGRESS_URL"] == url


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("replicaCount=-1", "/replicaCount"),
        ("operator.leaderElection.leaseDurationSeconds=1", "/operator/leaderElection"),
        ("operator.maxWorkers=0", "/operator/maxWorkers"),
        ("operator.deniedOptions={runAsRoot}", "/operator/deniedOptions/0"),
        ("operator.progressIntervalSeconds=0", "/operator/progressIntervalSeconds"),
        ("operator.jsonLogs=yes-please", "/operator/jsonLogs"),
        ("watchNamespaces={Not_A_Namespace}", "/watchNamespaces/0"),
        ("image.digest=latest", "/image/digest"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("trainer.runAsUser=-1", "/trainer/runAsUser"),
        ("metrics.serviceMonitor.interval=often", "/metrics/serviceMonitor/interval"),
        ("networkPolicy.apiServer.ports={0}", "/networkPolicy/apiServer/ports/0"),
        ("trainer.validation.resources.limits.memory=lots", "/trainer/validation/resources"),
        ("trainer.validation.activeDeadlineSeconds=0", "/trainer/validation"),
        ("metrics.auth=maybe", "/metrics/auth"),
        ("operatr.maxWorkers=3", "operatr"),
    ],
)
def test_values_schema_rejects_a_wrong_value_at_template_time(
    helm: Helm, setting: str, complaint: str
) -> None:
    result = helm("template", "kt", str(CHART), "--set", setting)

    assert result.returncode != 0, f"{setting} was accepted"
    assert complaint in result.stderr, result.stderr


def test_two_replicas_elect_a_leader_on_a_lease_in_the_release_namespace_with_a_pdb(
    render: Render,
) -> None:
    objects = render()
    env = deployment_env(objects)
    [pdb] = of_kind(objects, "PodDisruptionBudget")
    [deployment] = of_kind(objects, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [lease_role] = [
        r for r in of_kind(objects, "Role") if "leader-election" in r["metadata"]["name"]
    ]

    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert env["KUBETUNE_LEADER_ELECTION"] == "true"
    assert env["KUBETUNE_LEASE_NAMESPACE"] == lease_role["metadata"]["namespace"]
    assert grants(lease_role["rules"]) == {
        ("coordination.k8s.io", "leases", verb) for verb in ("get", "create", "update")
    }
    pod_name = next(e for e in container["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    single = render("--set", "replicaCount=1")
    assert of_kind(single, "PodDisruptionBudget") == []


def test_the_metrics_service_scrapes_the_metrics_port_and_the_dashboard_uses_real_metrics(
    render: Render,
) -> None:
    objects = render("--set", "metrics.grafanaDashboard.enabled=true")
    [service] = [
        s for s in of_kind(objects, "Service") if s["metadata"]["name"].endswith("metrics")
    ]
    [deployment] = of_kind(objects, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    [dashboard] = of_kind(objects, "ConfigMap")

    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert str(ports["metrics"]) == deployment_env(objects)["KUBETUNE_METRICS_PORT"]
    board = json.loads(dashboard["data"]["kubetune.json"])
    exprs = " ".join(t["expr"] for panel in board["panels"] for t in panel["targets"])
    for metric in (
        "kubetune_finetunejobs",
        "kubetune_phase_transitions_total",
        "kubetune_reconcile_duration_seconds_bucket",
        "kubetune_api_errors_total",
        "kubetune_finetunejob_progress_loss",
        "kubetune_finetunejob_progress_tokens_per_second",
        "kubetune_finetunejob_progress_eta_seconds",
    ):
        assert metric in exprs
    names = re.findall(r"\b(kubetune_[a-z_]+?)(?:_bucket|_count|_sum)?\b", exprs)
    served = {
        "kubetune_finetunejobs", "kubetune_phase_transitions_total",
        "kubetune_reconcile_duration_seconds", "kubetune_api_requests_total",
        "kubetune_api_errors_total", "kubetune_reconcile_retries_total",
        "kubetune_workqueue_depth", "kubetune_leader", "kubetune_create_to_job_seconds",
        "kubetune_finetunejob_progress_percent", "kubetune_finetunejob_progress_loss",
        "kubetune_finetunejob_progress_tokens_per_second",
        "kubetune_finetunejob_progress_eta_seconds",
    }  # fmt: skip
    assert set(names) <= served, set(names) - served


def test_the_trainer_status_policy_guards_every_status_field_but_progress(render: Render) -> None:
    """A status field the policy doesn't name is one a trainer could forge (status.estimate and
    status.worldSize were once missing): the policy's list is the model's, less progress."""
    from kubetune.api.models import FineTuneJobStatus

    [policy] = [
        p for p in of_kind(render(), "ValidatingAdmissionPolicy")
        if p["metadata"]["name"].endswith("-trainer-status")
    ]  # fmt: skip
    [validation] = policy["spec"]["validations"]
    guarded = set(re.findall(r"has\(object\.status\.(\w+)\)", validation["expression"]))
    fields = {field.alias or name for name, field in FineTuneJobStatus.model_fields.items()}
    assert guarded == fields - {"progress"}


def _secret_ref_paths(model: Any, prefix: str = "") -> set[str]:
    """Dotted camelCase paths of every Secret reference (a key of one, or a whole docker config
    Secret) under ``model``."""
    import typing

    from pydantic import BaseModel

    from kubetune.api.models import RegistryCredentialsRef, SecretKeyRef

    found: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        for kind in (field.annotation, *typing.get_args(field.annotation)):
            if kind is SecretKeyRef or kind is RegistryCredentialsRef:
                found.add(path)
            elif isinstance(kind, type) and issubclass(kind, BaseModel):
                found |= _secret_ref_paths(kind, f"{path}.")
    return found


def test_the_references_policy_checks_every_secret_reference_and_claim_of_the_spec(
    render: Render,
) -> None:
    """A Secret reference the policy doesn't name is one a creator could use without being
    allowed to read it: the policy's list is the model's."""
    from kubetune.api.models import FineTuneJobSpec

    [policy] = [
        p for p in of_kind(render(), "ValidatingAdmissionPolicy")
        if p["metadata"]["name"].endswith("-references")
    ]  # fmt: skip
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}

    def named(prefix: str) -> set[str]:
        return {
            field
            for name, expression in variables.items()
            if re.fullmatch(rf"{prefix}\d+", name)
            for field in re.findall(r"\['spec\.([\w.]+)'", expression)
        }

    assert named("secret") == _secret_ref_paths(FineTuneJobSpec)
    # Every URI the spec can name (FineTuneJobSpec.uris, all optional ones set) may name a claim.
    every_uri = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "pvc://work/model", "adapter": {"uri": "pvc://work/adapter"}},
            "dataset": {"uri": "pvc://work/data", "evalUri": "pvc://work/eval"},
            "output": {"uri": "oci://registry.example/adapters", "checkpointUri": "pvc://work/ck"},
        }
    )
    assert named("claim") == {field.removeprefix("spec.") for field, _, _ in every_uri.uris()}
    # CEL allows two authorization checks per expression: one check per variable, none in the
    # validation itself.
    for name, expression in variables.items():
        assert expression.count(".check(") <= 1, name
    for validation in policy["spec"]["validations"]:
        assert ".check(" not in validation["expression"] + validation.get("messageExpression", "")
        # Message expressions can't call the authorizer: nor may the variables they read.
        for name in re.findall(r"variables\.(\w+)", validation.get("messageExpression", "")):
            assert ".check(" not in variables[name], name
    assert "referencesPolicy" in CHART.joinpath("values.yaml").read_text()
    off = of_kind(render("--set", "referencesPolicy.enabled=false"), "ValidatingAdmissionPolicy")
    assert [p["metadata"]["name"].endswith("-trainer-status") for p in off] == [True]


def test_only_a_jobset_workload_grants_jobsets_and_then_every_child_is_held(render: Render) -> None:
    jobsets = {
        ("jobset.x-k8s.io", "jobsets", v) for v in ("get", "list", "watch", "create", "patch")
    }
    [default_role] = [
        r for r in operator_roles(render()) if r["metadata"]["name"].endswith("-operator")
    ]
    assert not {g for g in grants(default_role["rules"]) if g[0] == "jobset.x-k8s.io"}

    objects = render("-f", str(CHART / "ci" / "jobset-values.yaml"))
    assert deployment_env(objects)["KUBETUNE_GROUP_WORKLOAD"] == "jobset"
    [role] = [r for r in operator_roles(objects) if r["metadata"]["name"].endswith("-operator")]
    held = grants(role["rules"])
    assert {g for g in held if g[0] == "jobset.x-k8s.io"} == jobsets
    manifest = yaml.safe_load(
        (Path(__file__).parents[2] / "examples" / "tiny-cpu.yaml").read_text()
    )
    manifest["spec"]["resources"]["nodes"] = 2
    manifest["spec"]["training"]["microBatchSize"] = 8
    children = render_children(FineTuneJobSpec.model_validate(manifest["spec"]),
                               {"name": "tiny", "namespace": "ns", "uid": "u-1"},
                               OperatorSettings(), jobset=True)  # fmt: skip
    assert children[-1]["kind"] == "JobSet"
    for child in children:
        group = child["apiVersion"].rpartition("/")[0]
        plural = {"ConfigMap": "configmaps", "ServiceAccount": "serviceaccounts", "Role": "roles",
                  "RoleBinding": "rolebindings", "JobSet": "jobsets",
                  "NetworkPolicy": "networkpolicies"}[child["kind"]]  # fmt: skip
        assert {(group, plural, "create"), (group, plural, "get")} <= held, child["kind"]


def test_metrics_are_served_to_authorized_readers_by_default(render: Render) -> None:
    """The operator reviews each scraper's token and its right to get /metrics (tested against
    the real apiserver in tests/operator/test_metrics_auth.py); the chart grants the two reviews,
    a reader role to bind to Prometheus, and the ServiceMonitor sends Prometheus' token."""
    objects = render("--set", "metrics.serviceMonitor.enabled=true")
    [operator_auth] = [
        r for r in operator_roles(objects) if r["metadata"]["name"].endswith("-metrics-auth")
    ]
    [reader] = [
        r
        for r in of_kind(objects, "ClusterRole")
        if r["metadata"]["name"].endswith("-metrics-reader")
    ]
    [monitor] = of_kind(objects, "ServiceMonitor")

    assert deployment_env(objects)["KUBETUNE_METRICS_AUTH"] == "true"
    assert grants(operator_auth["rules"]) == {
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("authorization.k8s.io", "subjectaccessreviews", "create"),
    }
    assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    assert reader not in operator_roles(objects)  # bound by the admin, to the scraper
    assert monitor["spec"]["endpoints"][0]["bearerTokenFile"].endswith("serviceaccount/token")

    open_metrics = render(
        "--set", "metrics.auth=false", "--set", "metrics.serviceMonitor.enabled=true"
    )
    assert deployment_env(open_metrics)["KUBETUNE_METRICS_AUTH"] == "false"
    assert not [
        r for r in of_kind(open_metrics, "ClusterRole") if "metrics" in r["metadata"]["name"]
    ]
    assert (
        "bearerTokenFile" not in of_kind(open_metrics, "ServiceMonitor")[0]["spec"]["endpoints"][0]
    )


def test_validation_pod_values_reach_the_operator(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = deployment_env(render("--set", "trainer.validation.resources.limits.memory=2Gi",
                                "--set", "trainer.validation.activeDeadlineSeconds=600"))  # fmt: skip
    settings = settings_from(env, monkeypatch)

    assert settings.validation_memory_limit == "2Gi"
    assert settings.validation_active_deadline_seconds == 600
    assert settings.validation_cpu_request == "100m" and settings.validation_cpu_limit == "2"
    assert settings.validation_memory_request == "256Mi"
    assert settings.validation_ephemeral_storage_request == "512Mi"
    assert settings.validation_ephemeral_storage_limit == "10Gi"
