"""policy: what a FineTuneJob may ask of the cluster. Refused by default, allowed field by field
by the operator's settings, and whatever is merged stays under kubetune's own pod fields."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubetune.api.models import FineTuneJobSpec
from kubetune.operator.pod_template import merge_pod_spec
from kubetune.operator.policy import policy_problems
from kubetune.operator.render import render
from kubetune.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

METADATA = {"name": "victim-job", "namespace": "team-a", "uid": "uid-1"}
#: Everything a platform team may allow, all at once: hostile specs must still be refused.
PERMISSIVE = OperatorSettings(
    allowed_images=["registry.example.com/ml/*"],
    allowed_pod_template_fields=[
        "metadata.labels", "metadata.annotations", "tolerations", "volumes", "runtimeClassName",
        "containers.env", "containers.volumeMounts", "containers.resources",
    ],
    allowed_pod_template_env=["EXTRA", "TOKENIZERS_PARALLELISM"],
)  # fmt: skip


def spec_of(**overrides: Any) -> FineTuneJobSpec:
    data: dict[str, Any] = {
        "model": {"uri": "meta-llama/Llama-2-7b-hf", "tokenSecretRef": {"name": "hf-token"}},
        "dataset": {"uri": "pvc://data/support.jsonl"},
        "output": {"uri": "pvc://adapters/run"},
    }
    data.update(overrides)
    return FineTuneJobSpec.model_validate(data)


def template(**pod: Any) -> dict[str, Any]:
    return {"spec": pod}


def test_pod_template_and_image_are_refused_by_default_naming_the_field() -> None:
    spec = spec_of(
        image="attacker/trainer:latest",
        podTemplate={"metadata": {"labels": {"team": "a"}}, "spec": {"tolerations": []}},
    )
    assert policy_problems(spec, OperatorSettings()) == [
        "spec.image: 'attacker/trainer:latest' is not allowed by the operator's settings "
        "(allowed: none: the default trainer image only)",
        "spec.podTemplate.metadata.labels: not allowed by the operator's settings "
        "(KUBETUNE_ALLOWED_POD_TEMPLATE_FIELDS)",
        "spec.podTemplate.spec.tolerations: not allowed by the operator's settings "
        "(KUBETUNE_ALLOWED_POD_TEMPLATE_FIELDS)",
    ]


def test_an_image_matching_an_allowed_pattern_passes() -> None:
    assert policy_problems(spec_of(image="registry.example.com/ml/trainer:1.2"), PERMISSIVE) == []
    assert policy_problems(spec_of(image="registry.example.com/other:1"), PERMISSIVE)


@pytest.mark.parametrize(
    ("pod", "field"),
    [
        ({"hostPID": True}, "spec.podTemplate.spec.hostPID: never allowed"),
        ({"hostNetwork": True}, "spec.podTemplate.spec.hostNetwork: never allowed"),
        ({"hostIPC": True}, "spec.podTemplate.spec.hostIPC: never allowed"),
        ({"nodeName": "gpu-node-1"}, "spec.podTemplate.spec.nodeName: never allowed"),
        ({"serviceAccountName": "other-trainer"}, "spec.podTemplate.spec.serviceAccountName"),
        ({"securityContext": {"runAsUser": 0}}, "spec.podTemplate.spec.securityContext"),
        ({"initContainers": [{"name": "x", "image": "busybox"}]}, "spec.podTemplate.spec.initContainers"),
        ({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]},
         "spec.podTemplate.spec.volumes[0]: hostPath volumes are never allowed"),
        ({"containers": [{"name": "trainer", "securityContext": {"privileged": True}}]},
         "spec.podTemplate.spec.containers[0].securityContext: never allowed"),
        ({"containers": [{"name": "trainer", "command": ["sh", "-c", "cat /var/run/secrets/*"]}]},
         "spec.podTemplate.spec.containers[0].command: never allowed"),
        ({"containers": [{"name": "trainer", "lifecycle": {"postStart": {"exec": {}}}}]},
         "spec.podTemplate.spec.containers[0].lifecycle: never allowed"),
        ({"containers": [{"name": "sidecar", "image": "busybox"}]},
         "spec.podTemplate.spec.containers[0]: only the trainer container"),
    ],
)  # fmt: skip
def test_what_would_escape_the_pod_is_refused_whatever_the_settings(
    pod: dict[str, Any], field: str
) -> None:
    problems = policy_problems(spec_of(podTemplate=template(**pod)), PERMISSIVE)
    assert any(p.startswith(field) for p in problems), problems


def test_settings_cannot_allow_what_is_never_allowed() -> None:
    with pytest.raises(
        ValidationError, match=r"can never be allowed: hostPID, containers\.command"
    ):
        OperatorSettings(allowed_pod_template_fields=["hostPID", "containers.command", "volumes"])


def test_allowed_fields_merge_under_kubetunes_identity_command_labels_and_contract_env() -> None:
    spec = spec_of(
        podTemplate={
            "metadata": {
                "labels": {"team": "a", "kubetune.io/job": "other-job",
                           "app.kubernetes.io/managed-by": "me"},
                "annotations": {"note": "x", "kubetune.io/finetunejob": "other-job"},
            },
            "spec": {
                "runtimeClassName": "nvidia",
                "volumes": [{"name": "config", "configMap": {"name": "my-own-config"}},
                            {"name": "scratch", "emptyDir": {}}],
                "containers": [{"name": "trainer", "env": [
                    {"name": "EXTRA", "value": "1"},
                    {"name": "KUBETUNE_PVC_ROOT", "value": "/"},
                    {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}},
                ], "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
            },
        }
    )  # fmt: skip
    # The policy refuses kubetune's own variables and Secret sources; were they let through, the
    # merge still keeps kubetune's.
    env_field = "spec.podTemplate.spec.containers[0].env"
    assert policy_problems(spec, PERMISSIVE) == [
        f"{env_field}[1]: KUBETUNE_PVC_ROOT is never allowed (it would redirect or run code)",
        f"{env_field}[2].valueFrom: secretKeyRef never allowed (Secrets reach the trainer only "
        "through the spec's secret references)",
        f"{env_field}[2]: HF_TOKEN is never allowed (it would redirect or run code)",
    ]
    job = next(o for o in render(spec, METADATA, PERMISSIVE) if o["kind"] == "Job")
    pod_template = job["spec"]["template"]
    pod = pod_template["spec"]
    (trainer,) = pod["containers"]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["EXTRA"]["value"] == "1"
    assert env["KUBETUNE_PVC_ROOT"]["value"] == "/mnt/pvc"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    assert {m["mountPath"] for m in trainer["volumeMounts"]} >= {"/scratch", "/etc/kubetune"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "victim-job-trainer-config"
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["serviceAccountName"] == "default"
    assert trainer["command"][0] == "kubetune-trainer"
    assert trainer["securityContext"]["allowPrivilegeEscalation"] is False
    labels, annotations = (
        pod_template["metadata"]["labels"],
        pod_template["metadata"]["annotations"],
    )
    assert labels["team"] == "a"
    assert labels["kubetune.io/job"] == "victim-job"
    assert labels["app.kubernetes.io/managed-by"] == "kubetune-operator"
    assert annotations == {"note": "x", "kubetune.io/finetunejob": "victim-job"}


@pytest.mark.parametrize(
    ("field", "uri"),
    [("model", "/models/llama"), ("dataset", "file:///etc/passwd"), ("output", "out/adapter")],
)
def test_node_paths_are_refused_in_the_cluster(field: str, uri: str) -> None:
    problems = policy_problems(spec_of(**{field: {"uri": uri}}), OperatorSettings())
    assert problems == [
        f"spec.{field}.uri: {uri!r} is a path on the node; in a cluster use pvc://<claim>/<path> "
        "(local paths and file:// are for `kubetune train`)"
    ]


def test_hub_ids_and_remote_uris_are_fine_in_the_cluster() -> None:
    spec = spec_of(model={"uri": "org/model"}, dataset={"uri": "https://example.org/d.jsonl"})
    assert policy_problems(spec, OperatorSettings()) == []


def test_denied_options_name_the_field() -> None:
    spec = spec_of(model={"uri": "org/model", "trustRemoteCode": True})
    assert policy_problems(spec, OperatorSettings()) == [
        "spec.model.trustRemoteCode: denied by the operator's settings (KUBETUNE_DENIED_OPTIONS)"
    ]
    assert policy_problems(spec, OperatorSettings(denied_options=[])) == []


def test_merge_replaces_unnamed_lists_and_scalars() -> None:
    merged = merge_pod_spec({"a": [1, 2], "b": {"c": 1, "d": 2}}, {"a": [3], "b": {"c": 5}})
    assert merged == {"a": [3], "b": {"c": 5, "d": 2}}


def trainer_template(**container: Any) -> dict[str, Any]:
    return template(containers=[{"name": "trainer", **container}])


@pytest.mark.parametrize(
    "name",
    ["HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY",
     "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PYTHONPATH", "LD_PRELOAD",
     "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "HF_PUSH_TOKEN"],
)  # fmt: skip
def test_env_that_redirects_tokens_or_runs_code_is_refused_with_containers_env_allowed(
    name: str,
) -> None:
    spec = spec_of(podTemplate=trainer_template(env=[{"name": name, "value": "http://evil:1"}]))
    (problem,) = policy_problems(spec, PERMISSIVE)
    assert problem.startswith(f"spec.podTemplate.spec.containers[0].env[0]: {name} ")


def test_env_names_come_from_the_settings_allowlist_with_plain_values_only() -> None:
    env = [
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        {"name": "NOT_LISTED", "value": "1"},
        {"name": "EXTRA", "valueFrom": {"secretKeyRef": {"name": "other-team", "key": "k"}}},
        {"name": "EXTRA", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
        {"name": "EXTRA", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    problems = policy_problems(spec_of(podTemplate=trainer_template(env=env)), PERMISSIVE)
    field = "spec.podTemplate.spec.containers[0].env"
    assert problems == [
        f"{field}[1]: NOT_LISTED is not allowed by the operator's settings "
        "(KUBETUNE_ALLOWED_POD_TEMPLATE_ENV)",
        f"{field}[2].valueFrom: secretKeyRef never allowed (Secrets reach the trainer only "
        "through the spec's secret references)",
        f"{field}[3].valueFrom: configMapKeyRef never allowed (Secrets reach the trainer only "
        "through the spec's secret references)",
    ]


def test_env_from_is_never_allowed_and_no_setting_can_allow_it_or_a_redirecting_variable() -> None:
    spec = spec_of(podTemplate=trainer_template(envFrom=[{"secretRef": {"name": "s3-creds"}}]))
    assert policy_problems(spec, PERMISSIVE) == [
        "spec.podTemplate.spec.containers[0].envFrom: never allowed (kubetune sets it)"
    ]
    with pytest.raises(ValidationError, match=r"can never be allowed: containers\.envFrom"):
        OperatorSettings(allowed_pod_template_fields=["containers.envFrom"])
    with pytest.raises(ValidationError, match=r"can never be allowed: https_proxy, LD_PRELOAD"):
        OperatorSettings(allowed_pod_template_env=["https_proxy", "LD_PRELOAD", "OK"])


@pytest.mark.parametrize(
    ("name", "setting"),
    [("HF_ENDPOINT", "allowed_hub_endpoints"),
     ("AWS_ENDPOINT_URL", "allowed_object_store_endpoints"),
     ("AWS_ENDPOINT_URL_S3", "allowed_object_store_endpoints")],
)  # fmt: skip
def test_hub_and_object_store_endpoints_only_from_the_settings_allowlist(
    name: str, setting: str
) -> None:
    def problems(value: str, endpoints: list[str]) -> list[str]:
        settings = PERMISSIVE.model_copy(update={setting: endpoints})
        env = [{"name": name, "value": value}]
        return policy_problems(spec_of(podTemplate=trainer_template(env=env)), settings)

    assert problems("https://store.internal.example", ["https://store.internal.example/"]) == []
    (denied,) = problems("https://attacker.example", ["https://store.internal.example"])
    assert denied == (
        f"spec.podTemplate.spec.containers[0].env[0]: {name} must be one of the endpoints the "
        f"operator's settings allow (KUBETUNE_{setting.upper()}: https://store.internal.example)"
    )
    assert problems("https://store.internal.example", [])


@pytest.mark.parametrize(
    "path",
    ["/mnt/pvc", "/mnt/pvc/data", "/mnt/pvc/adapters/run/secret", "/mnt", "/", "/etc/kubetune",
     "/etc/kubetune/config.yaml", "/dev/shm", "/dev", "/mnt/pvc/../pvc/data",
     "/var/run/secrets/kubernetes.io/serviceaccount"],
)  # fmt: skip
def test_no_mount_over_or_inside_the_claims_the_config_or_shared_memory(path: str) -> None:
    mounts = [{"name": "scratch", "mountPath": "/scratch"}, {"name": "x", "mountPath": path}]
    spec = spec_of(podTemplate=trainer_template(volumeMounts=mounts))
    (problem,) = policy_problems(spec, PERMISSIVE)
    assert problem.startswith("spec.podTemplate.spec.containers[0].volumeMounts[1].mountPath: ")
    assert "never allowed" in problem


def tracked(uri: str, **credentials: Any) -> FineTuneJobSpec:
    return spec_of(tracking={"mlflow": {"trackingUri": uri, "experimentName": "e", **credentials}})


TOKEN_REF = {"tokenSecretRef": {"name": "mlflow", "key": "token"}}
BASIC = {"usernameSecretRef": {"name": "m", "key": "u"}, "passwordSecretRef": {"name": "m", "key": "p"}}  # fmt: skip


@pytest.mark.parametrize("credentials", [TOKEN_REF, BASIC], ids=["token", "basic"])
def test_mlflow_credentials_go_only_over_https_by_default(credentials: dict[str, Any]) -> None:
    assert (
        policy_problems(tracked("https://mlflow.example", **credentials), OperatorSettings()) == []
    )
    assert (
        policy_problems(
            tracked(
                "http://mlflow.example",
            ),
            OperatorSettings(),
        )
        == []
    )
    assert policy_problems(
        tracked("http://attacker.example:53", **credentials), OperatorSettings()
    ) == [
        "spec.tracking.mlflow.trackingUri: credentials (usernameSecretRef, passwordSecretRef, "
        "tokenSecretRef) go only over https; 'attacker.example:53' is plain http (denied by the "
        "operator's settings, KUBETUNE_TRACKING_HTTP_CREDENTIALS_HOSTS)"
    ]
    in_cluster = OperatorSettings(tracking_http_credentials_hosts=["*.svc.cluster.local"])
    assert policy_problems(tracked("http://mlflow.ml.svc.cluster.local:5000", **credentials), in_cluster) == []  # fmt: skip


def test_mlflow_tracking_hosts_from_the_settings_allowlist() -> None:
    settings = OperatorSettings(allowed_tracking_hosts=["mlflow.example", "*.ml.example:443"])
    assert policy_problems(tracked("https://mlflow.example/x", **TOKEN_REF), settings) == []
    assert policy_problems(tracked("https://a.ml.example:443", **TOKEN_REF), settings) == []
    assert policy_problems(tracked("https://attacker.example"), settings) == [
        "spec.tracking.mlflow.trackingUri: host 'attacker.example' is not allowed by the "
        "operator's settings (KUBETUNE_ALLOWED_TRACKING_HOSTS: mlflow.example, *.ml.example:443)"
    ]


def test_projected_secret_sources_are_refused_secret_volumes_go_to_admission() -> None:
    volumes = [
        {"name": "mine", "secret": {"secretName": "team-a-creds"}},
        {"name": "info", "projected": {"sources": [{"downwardAPI": {"items": []}}]}},
        {"name": "theirs", "projected": {"sources": [{"secret": {"name": "other-team"}}]}},
    ]
    problems = policy_problems(spec_of(podTemplate=template(volumes=volumes)), PERMISSIVE)
    assert problems == [
        "spec.podTemplate.spec.volumes[2]: projected Secret sources are never allowed (use a "
        "secret volume: its Secret must be one the job's creator may read)"
    ]


def test_a_pod_template_may_not_project_a_service_account_token_of_any_audience() -> None:
    volumes = [
        {
            "name": "api",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": "https://kubernetes.default.svc",
                            "path": "t",
                        }
                    }
                ]
            },
        }
    ]
    problems = policy_problems(spec_of(podTemplate=template(volumes=volumes)), PERMISSIVE)
    assert problems == [
        "spec.podTemplate.spec.volumes[0]: projected serviceAccountToken sources are never "
        "allowed (a trainer pod has no Kubernetes API identity)"
    ]  # fmt: skip


def test_the_object_stores_keys_go_only_to_an_endpoint_the_settings_allow() -> None:
    store = {
        "endpoint": "https://attacker.example",
        "accessKeyIdSecretRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"},
        "secretAccessKeySecretRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"},
    }
    spec = spec_of(objectStore=store)
    assert policy_problems(spec, OperatorSettings()) == [
        "spec.objectStore.endpoint: AWS_ENDPOINT_URL must be one of the endpoints the operator's "
        "settings allow (KUBETUNE_ALLOWED_OBJECT_STORE_ENDPOINTS: none)"
    ]
    allowed = OperatorSettings(allowed_object_store_endpoints=["https://attacker.example"])
    assert policy_problems(spec, allowed) == []
    # AWS's own endpoint needs no allowance.
    assert (
        policy_problems(spec_of(objectStore={**store, "endpoint": None}), OperatorSettings()) == []
    )


def test_the_object_stores_key_id_and_secret_key_come_together() -> None:
    with pytest.raises(ValidationError, match="accessKeyIdSecretRef and secretAccessKeySecretRef"):
        spec_of(objectStore={"accessKeyIdSecretRef": {"name": "s3-creds", "key": "id"}})


def oci_output(uri: str, **registry: Any) -> dict[str, Any]:
    output: dict[str, Any] = {"uri": uri, "checkpointUri": "pvc://adapters/checkpoints/run"}
    if registry:
        output["registry"] = registry
    return output


def test_an_oci_output_only_to_a_registry_the_settings_allow() -> None:
    spec = spec_of(output=oci_output("oci://registry.example.com:5000/team/adapter:v1"))
    allowed = PERMISSIVE.model_copy(update={"allowed_registries": ["*.example.com:5000"]})
    assert policy_problems(spec, allowed) == []
    (denied,) = policy_problems(spec, PERMISSIVE)
    assert denied == (
        "spec.output.uri: registry 'registry.example.com:5000' is not allowed by the operator's "
        "settings (KUBETUNE_ALLOWED_REGISTRIES: none)"
    )
    other = PERMISSIVE.model_copy(update={"allowed_registries": ["ghcr.io"]})
    assert policy_problems(spec, other)[0].endswith("(KUBETUNE_ALLOWED_REGISTRIES: ghcr.io)")


def test_plain_http_only_to_a_registry_the_settings_name_for_it() -> None:
    spec = spec_of(output=oci_output("oci://127.0.0.1:5000/team/adapter", plainHttp=True))
    settings = PERMISSIVE.model_copy(update={"allowed_registries": ["127.0.0.1:*"]})
    (denied,) = policy_problems(spec, settings)
    assert denied.startswith(
        "spec.output.registry.plainHttp: registry '127.0.0.1:5000' may be reached only over https"
    )
    local = settings.model_copy(update={"plain_http_registries": ["127.0.0.1:5000"]})
    assert policy_problems(spec, local) == []


def test_an_oci_output_mounts_its_login_for_the_trainer_alone_and_its_checkpoint_claim() -> None:
    spec = spec_of(
        output=oci_output("oci://ghcr.io/team/adapter", credentialsSecretRef={"name": "regcred"})
    )
    job = next(o for o in render(spec, METADATA, OperatorSettings()) if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["registry-auth"]["secret"] == {
        "secretName": "regcred",
        "items": [{"key": ".dockerconfigjson", "path": ".dockerconfigjson"}],
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["registry-auth"]["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["REGISTRY_AUTH_FILE"] == f"{mounts['registry-auth']['mountPath']}/.dockerconfigjson"
    # The checkpoints' claim is mounted writable; the registry is no claim.
    assert volumes["pvc-adapters"]["persistentVolumeClaim"] == {"claimName": "adapters"}
    assert mounts["pvc-adapters"]["readOnly"] is False


@pytest.mark.parametrize("name", ["REGISTRY_AUTH_FILE", "DOCKER_CONFIG"])
def test_no_pod_template_points_the_trainer_at_another_registry_login(name: str) -> None:
    env = [{"name": name, "value": "/scratch/config.json"}]
    (problem,) = policy_problems(spec_of(podTemplate=trainer_template(env=env)), PERMISSIVE)
    assert problem.startswith("spec.podTemplate.spec.containers[0].env[0]")


def test_a_starting_adapter_is_pulled_only_from_an_allowed_registry_with_its_own_login() -> None:
    digest = "sha256:" + "0" * 64
    model = {"uri": "pvc://models/base", "adapter": {
        "uri": f"oci://registry.example.com/team/adapter@{digest}",
        "registry": {"credentialsSecretRef": {"name": "pull-cred"}, "plainHttp": True}}}  # fmt: skip
    spec = spec_of(model=model)
    (denied_host, denied_http) = policy_problems(spec, PERMISSIVE)
    assert denied_host.startswith("spec.model.adapter.uri: registry 'registry.example.com' is not")
    assert denied_http.startswith("spec.model.adapter.registry.plainHttp: registry 'registry.")
    job = next(o for o in render(spec, METADATA, OperatorSettings()) if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["adapter-registry-auth"]["secret"]["secretName"] == "pull-cred"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["KUBETUNE_ADAPTER_REGISTRY_AUTH_FILE"].endswith("/.dockerconfigjson")
    assert "REGISTRY_AUTH_FILE" not in env  # the output's login: none asked for


def test_a_starting_adapter_on_a_claim_is_mounted_read_only() -> None:
    spec = spec_of(model={"uri": "org/model", "adapter": {"uri": "pvc://previous/run"}})
    job = next(o for o in render(spec, METADATA, OperatorSettings()) if o["kind"] == "Job")
    mounts = {
        m["name"]: m for m in job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert mounts["pvc-previous"]["readOnly"] is True
