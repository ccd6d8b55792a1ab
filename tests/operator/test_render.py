"""render: a FineTuneJob's spec → the ConfigMap, RBAC and batch/v1 Job that run it."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from kubetune.api.config import TrainerConfig
from kubetune.api.models import FineTuneJobSpec, PodTemplateOverrides
from kubetune.operator.names import child_names, short_name
from kubetune.operator.render import render, render_validation
from kubetune.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

METADATA = {"name": "llama2-support", "namespace": "team-a", "uid": "uid-1234"}


def spec_of(**overrides: Any) -> FineTuneJobSpec:
    data: dict[str, Any] = {
        "model": {
            "uri": "meta-llama/Llama-2-7b-hf",
            "tokenSecretRef": {"name": "hf-token", "key": "token"},
        },
        "dataset": {"uri": "pvc://data/support.jsonl"},
        "training": {"epochs": 3, "learningRate": 5e-4, "batchSize": 16},
        "output": {"uri": "pvc://adapters/llama2-support"},
        "resources": {"gpus": 1},
    }
    data.update(overrides)
    return FineTuneJobSpec.model_validate(data)


def rendered(spec: FineTuneJobSpec | None = None, **settings: Any) -> dict[str, dict[str, Any]]:
    objects = render(spec or spec_of(), METADATA, OperatorSettings(**settings))
    return {obj["kind"]: obj for obj in objects}


def pod_spec(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = objects["Job"]["spec"]["template"]["spec"]
    return spec


def trainer(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec(objects)["containers"] if c["name"] == "trainer"]
    return container


def test_children_come_in_creation_order() -> None:
    kinds = [obj["kind"] for obj in render(spec_of(), METADATA, OperatorSettings())]
    assert kinds == ["ConfigMap", "NetworkPolicy", "Job"]
    without = render(spec_of(), METADATA, OperatorSettings(trainer_network_policy=False))
    assert "NetworkPolicy" not in [obj["kind"] for obj in without]


CLUSTER_DNS = {
    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
}  # fmt: skip


def test_trainer_network_policy_allows_dns_and_egress_but_the_metadata_address() -> None:
    policy = rendered()["NetworkPolicy"]
    assert policy["spec"]["podSelector"] == {"matchLabels": {
        "app.kubernetes.io/name": "kubetune", "app.kubernetes.io/managed-by": "kubetune-operator"}}  # fmt: skip
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy["spec"]
    dns, reach = policy["spec"]["egress"]
    assert dns == CLUSTER_DNS
    v4, v6 = reach["to"]
    assert v4["ipBlock"]["cidr"] == "0.0.0.0/0" and v6["ipBlock"]["cidr"] == "::/0"
    for metadata in ("169.254.169.254/32", "100.100.100.200/32", "192.0.0.192/32"):
        assert metadata in v4["ipBlock"]["except"]
    for metadata in ("fd00:ec2::254/128", "fd20:ce::254/128"):
        assert metadata in v6["ipBlock"]["except"]
    only_dns = rendered(trainer_egress_cidrs=[])["NetworkPolicy"]
    assert only_dns["spec"]["egress"] == [dns]


def test_one_trainer_policy_per_namespace_selects_every_jobs_trainer_and_validation_pods() -> None:
    """The namespace's trainer NetworkPolicy is one object, the same for every job there (no
    job owns it); it selects each job's trainer pod and validation pod, whatever a permitted
    pod template says about labels."""
    settings = OperatorSettings(allowed_pod_template_fields=["metadata.labels"])
    other = {**METADATA, "name": "another-job", "uid": "uid-5678"}
    relabelled = spec_of(podTemplate={"metadata": {"labels": {
        "app.kubernetes.io/name": "mine", "app.kubernetes.io/managed-by": "me"}}})  # fmt: skip
    first = render(spec_of(), METADATA, settings)
    second = render(relabelled, other, settings)
    (policy,) = [o for o in first if o["kind"] == "NetworkPolicy"]
    assert [o for o in second if o["kind"] == "NetworkPolicy"] == [policy]
    assert policy["metadata"]["name"] == "kubetune-trainers"
    assert "ownerReferences" not in policy["metadata"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    validation = render_validation(spec_of(), METADATA, settings)[-1]
    for job in (first[-1], second[-1], validation):
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()


def test_dns_goes_only_to_the_clusters_dns_pods_not_port_53_anywhere() -> None:
    for rule in rendered()["NetworkPolicy"]["spec"]["egress"]:
        assert rule.get("to"), f"a rule with no destination opens its ports to any address: {rule}"
    custom = rendered(
        trainer_dns_namespace_selector={"dns": "here"},
        trainer_dns_pod_selector={"app": "coredns"},
        trainer_dns_cidrs=["169.254.20.10/32"],
    )["NetworkPolicy"]["spec"]["egress"][0]
    assert custom["to"] == [
        {"namespaceSelector": {"matchLabels": {"dns": "here"}},
         "podSelector": {"matchLabels": {"app": "coredns"}}},
        {"ipBlock": {"cidr": "169.254.20.10/32"}},
    ]  # fmt: skip
    assert {p["port"] for p in custom["ports"]} == {53}


def test_default_egress_excepts_private_cluster_loopback_and_link_local_ranges() -> None:
    (v4, v6) = rendered(trainer_cluster_cidrs=["198.18.0.0/16", "fd99::/108"])["NetworkPolicy"][
        "spec"
    ]["egress"][1]["to"]
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
            "169.254.0.0/16", "198.18.0.0/16"} <= set(v4["ipBlock"]["except"])  # fmt: skip
    assert {"::1/128", "fe80::/10", "fc00::/7", "fd99::/108"} <= set(v6["ipBlock"]["except"])
    # Each family's excepts stay in their own block.
    assert all(":" not in e for e in v4["ipBlock"]["except"])
    assert all(":" in e for e in v6["ipBlock"]["except"])


def test_only_the_excepts_inside_each_cidr_are_emitted() -> None:
    # The tracking guide's narrowed example: the pods' CIDR and one outside address.
    blocks = rendered(trainer_egress_cidrs=["10.244.0.0/16", "203.0.113.10/32"])["NetworkPolicy"][
        "spec"
    ]["egress"][1]["to"]
    assert blocks == [{"ipBlock": {"cidr": "10.244.0.0/16"}},
                      {"ipBlock": {"cidr": "203.0.113.10/32"}}]  # fmt: skip
    inside = rendered(trainer_egress_cidrs=["169.254.0.0/16"], trainer_egress_except=[
        "169.254.169.254/32", "169.254.0.0/16", "10.0.0.0/8", "fd00:ec2::254/128"])  # fmt: skip
    (block,) = inside["NetworkPolicy"]["spec"]["egress"][1]["to"]
    assert block == {"ipBlock": {"cidr": "169.254.0.0/16", "except": ["169.254.169.254/32"]}}


def test_the_api_server_is_reached_on_its_ports_where_the_platform_names_it() -> None:
    egress = rendered(trainer_apiserver_cidrs=["10.0.0.1/32"])["NetworkPolicy"]["spec"]["egress"]
    assert {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
            "ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]} in egress  # fmt: skip


@pytest.mark.parametrize(
    "setting", ["trainer_egress_cidrs", "trainer_egress_except", "trainer_cluster_cidrs",
                "trainer_dns_cidrs", "trainer_download_allowed_cidrs"]
)  # fmt: skip
def test_a_setting_that_is_not_a_cidr_fails_the_operators_start(setting: str) -> None:
    with pytest.raises(ValueError, match="not CIDRs"):
        OperatorSettings(**{setting: ["10.0.0.1/8"]})  # host bits set: the apiserver refuses it


def test_the_trainer_downloads_only_from_public_addresses_unless_the_settings_allow_more() -> None:
    env = {e["name"]: e.get("value") for e in trainer(rendered())["env"]}
    assert env["KUBETUNE_DOWNLOAD_ALLOWED_CIDRS"] == ""
    allowed = rendered(trainer_download_allowed_cidrs=["10.1.0.0/16", "fd00::/8"])
    env = {e["name"]: e.get("value") for e in trainer(allowed)["env"]}
    assert env["KUBETUNE_DOWNLOAD_ALLOWED_CIDRS"] == "10.1.0.0/16,fd00::/8"
    # Where a pod template may set env, it can't widen what the platform allows.
    widened = spec_of(podTemplate={"spec": {"containers": [{"name": "trainer", "env": [
        {"name": "KUBETUNE_DOWNLOAD_ALLOWED_CIDRS", "value": "0.0.0.0/0,::/0"}]}]}})  # fmt: skip
    env_of = trainer(rendered(widened, allowed_pod_template_fields=["containers.env"]))["env"]
    assert {e["name"]: e.get("value") for e in env_of}["KUBETUNE_DOWNLOAD_ALLOWED_CIDRS"] == ""


def test_every_child_is_owned_by_the_finetunejob_and_labelled() -> None:
    """Every child but the namespace's shared trainer policy, which no job owns."""
    for obj in render(group_spec(), METADATA, OperatorSettings()):
        meta = obj["metadata"]
        if meta["name"] == "kubetune-trainers":
            assert "ownerReferences" not in meta and meta["namespace"] == "team-a"
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
            continue
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": "llama2-support",
                "uid": "uid-1234",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["kubetune.io/job"] == "llama2-support"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
        assert meta["labels"]["app.kubernetes.io/name"] == "kubetune"


def test_config_map_holds_the_resolved_trainer_config() -> None:
    objects = rendered(progress_interval_seconds=3)
    config = TrainerConfig.model_validate(
        yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    )
    assert config.job is not None
    assert (config.job.name, config.job.namespace, config.job.uid) == (
        "llama2-support",
        "team-a",
        "uid-1234",
    )
    assert config.spec == spec_of()
    assert config.progress.reporter == "none"  # no progress endpoint in these settings
    assert config.progress.interval_seconds == 3


def test_config_map_never_holds_a_secret_value() -> None:
    text = rendered()["ConfigMap"]["data"]["config.yaml"]
    assert "hf-token" in text  # the reference, by name
    assert "HF_TOKEN" not in text


PROGRESS = {
    "progress_url": "https://kubetune-progress.kubetune-system.svc:8443/v1/progress",
    "progress_ca_bundle": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
}


def test_no_rbac_is_made_per_job_and_the_pod_mounts_no_api_token() -> None:
    objects = render(spec_of(), METADATA, OperatorSettings(**PROGRESS))
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ServiceAccount", "Role", "RoleBinding"}
    pod = objects[-1]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "default"  # the namespace's, never one per job
    assert pod["automountServiceAccountToken"] is False


def test_the_pods_only_credential_is_a_short_lived_progress_token_of_kubetunes_audience() -> None:
    objects = rendered(**PROGRESS)
    pod = pod_spec(objects)
    (volume,) = [v for v in pod["volumes"] if "projected" in v]
    (source,) = volume["projected"]["sources"]
    assert source == {"serviceAccountToken": {"audience": "kubetune.io/progress",
                                              "expirationSeconds": 600, "path": "token"}}  # fmt: skip
    (mount,) = [m for m in trainer(objects)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": "progress-token", "readOnly": True,
                     "mountPath": "/var/run/secrets/kubetune.io/progress"}  # fmt: skip
    config = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])["progress"]
    assert config["reporter"] == "operator"
    assert config["url"] == PROGRESS["progress_url"]
    assert config["caBundle"] == PROGRESS["progress_ca_bundle"]
    assert config["tokenFile"] == "/var/run/secrets/kubetune.io/progress/token"


def test_without_a_progress_endpoint_the_pod_has_no_token_at_all() -> None:
    objects = rendered()
    assert not [v for v in pod_spec(objects)["volumes"] if "projected" in v]
    config = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])["progress"]
    assert config["reporter"] == "none"


def test_the_validation_pod_gets_no_progress_token() -> None:
    settings = OperatorSettings(**PROGRESS)
    validation = render_validation(spec_of(), METADATA, settings)[-1]
    pod = validation["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "projected" in v]
    assert not [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "progress-token"]


def test_the_validation_job_leaves_the_trainer_job_it_is_made_from_as_it_was() -> None:
    from kubetune.operator.render import validation_job

    spec = spec_of(scheduling={"queueName": "team-a"})
    settings = OperatorSettings(**PROGRESS)
    job = render(spec, METADATA, settings)[-1]
    before = json.dumps(job)
    validation = validation_job(job, spec, "llama2-support-validate", settings)
    assert json.dumps(job) == before
    assert json.dumps(validation) != before
    mounts = validation["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert all(m.get("readOnly") for m in mounts if m["name"].startswith("pvc-"))
    assert "kueue.x-k8s.io/queue-name" not in validation["metadata"]["labels"]
    assert "kueue.x-k8s.io/queue-name" in job["metadata"]["labels"]


def test_the_network_policy_lets_the_trainer_reach_the_operators_progress_port() -> None:
    settings = {**PROGRESS, "progress_peer_pod_selector": {"app.kubernetes.io/name": "kubetune"},
                "progress_peer_namespace_selector": {"kubernetes.io/metadata.name": "kt"}}  # fmt: skip
    policy = rendered(**settings)["NetworkPolicy"]
    assert {
        "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubetune"}},
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kt"}}}],
        "ports": [{"port": 8443, "protocol": "TCP"}],
    } in policy["spec"]["egress"]  # fmt: skip


def test_gpu_is_requested_and_limited_by_its_resource_name() -> None:
    spec = spec_of(
        resources={"gpus": 1, "gpuResourceName": "amd.com/gpu", "cpu": 8, "memory": "32Gi"}
    )
    resources = trainer(rendered(spec))["resources"]
    expected = {"amd.com/gpu": "1", "cpu": "8", "memory": "32Gi"}
    assert resources == {"requests": expected, "limits": expected}


def test_cpu_only_job_requests_no_gpu() -> None:
    resources = trainer(rendered(spec_of(resources={"gpus": 0})))["resources"]
    assert resources == {"requests": {}, "limits": {}}


def test_trainer_runs_an_explicit_command_on_the_mounted_config() -> None:
    objects = rendered()
    container = trainer(objects)
    assert container["command"] == ["kubetune-trainer", "--config", "/etc/kubetune/config.yaml"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_volume = mounts["/etc/kubetune"]["name"]
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes[config_volume]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]


def test_default_image_comes_from_settings_and_spec_image_wins() -> None:
    assert trainer(rendered(trainer_image="registry.local/t:1"))["image"] == "registry.local/t:1"
    assert trainer(rendered(spec_of(image="mine:2")))["image"] == "mine:2"


def test_hub_token_comes_from_the_secret_by_reference() -> None:
    env = {e["name"]: e for e in trainer(rendered())["env"]}
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
    }
    assert "value" not in env["HF_TOKEN"]


def test_no_token_env_without_a_secret_ref() -> None:
    spec = spec_of(model={"uri": "hf://tiny/model"})
    assert "HF_TOKEN" not in {e["name"] for e in trainer(rendered(spec))["env"]}


def test_push_token_is_its_own_variable_beside_the_read_token() -> None:
    spec = spec_of(
        output={
            "uri": "pvc://adapters/run",
            "pushToHub": {"repoId": "me/run", "tokenSecretRef": {"name": "hub-write", "key": "t"}},
        }
    )
    env = {e["name"]: e for e in trainer(rendered(spec))["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert env["HF_PUSH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hub-write", "key": "t"}


def test_each_pvc_claim_is_mounted_once_under_the_pvc_root() -> None:
    spec = spec_of(
        model={"uri": "pvc://store/models/tiny"},
        dataset={"uri": "pvc://store/data/train.jsonl"},
        output={"uri": "pvc://adapters/run-1"},
    )
    objects = rendered(spec)
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["name"]
        for v in pod_spec(objects)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert sorted(claims) == ["adapters", "store"]
    mounts = {m["name"]: m for m in trainer(objects)["volumeMounts"]}
    assert mounts[claims["store"]]["mountPath"] == "/mnt/pvc/store"
    assert mounts[claims["store"]]["readOnly"] is True
    assert mounts[claims["adapters"]]["mountPath"] == "/mnt/pvc/adapters"
    assert mounts[claims["adapters"]]["readOnly"] is False
    env = {e["name"]: e.get("value") for e in trainer(objects)["env"]}
    assert env["KUBETUNE_PVC_ROOT"] == "/mnt/pvc"


def test_claim_used_for_input_and_output_is_writable() -> None:
    spec = spec_of(dataset={"uri": "pvc://work/data.jsonl"}, output={"uri": "pvc://work/out"})
    mounts = [
        m for m in trainer(rendered(spec))["volumeMounts"] if m["mountPath"].startswith("/mnt")
    ]
    assert mounts == [{"name": "pvc-work", "mountPath": "/mnt/pvc/work", "readOnly": False}]


def test_dev_shm_is_a_memory_backed_empty_dir() -> None:
    objects = rendered(spec_of(resources={"gpus": 1, "shmSize": "2Gi"}))
    shm = next(m for m in trainer(objects)["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == shm["name"])
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}


def test_pod_is_restricted_by_default() -> None:
    objects = rendered()
    pod_security = pod_spec(objects)["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == 1000
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    container_security = trainer(objects)["securityContext"]
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["capabilities"] == {"drop": ["ALL"]}
    assert container_security["runAsNonRoot"] is True
    # A read-only root; what a run writes outside its output goes to emptyDirs.
    assert container_security["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in trainer(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes[mounts["/tmp"]]["emptyDir"] == {}
    assert volumes[mounts["/home/kubetune"]]["emptyDir"] == {}
    assert {"name": "HOME", "value": "/home/kubetune"} in trainer(objects)["env"]


def test_pod_identity_can_be_relaxed_by_settings_for_the_local_cluster() -> None:
    objects = rendered(run_as_non_root=False, run_as_user=None, fs_group=None)
    pod_security = pod_spec(objects)["securityContext"]
    assert pod_security["runAsNonRoot"] is False
    assert "runAsUser" not in pod_security
    assert "fsGroup" not in pod_security
    assert trainer(objects)["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_job_fails_fast_on_non_retriable_exit_codes_and_ignores_disruptions() -> None:
    job = rendered()["Job"]["spec"]
    assert job["podFailurePolicy"]["rules"] == [
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": "trainer",
                "operator": "In",
                "values": [2, 3, 4, 5, 6],
            },
        },
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
    ]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert trainer(rendered())["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_run_policy_sets_backoff_deadline_and_suspend() -> None:
    spec = spec_of(runPolicy={"backoffLimit": 1, "activeDeadlineSeconds": 600, "suspend": True})
    job = rendered(spec)["Job"]["spec"]
    assert (job["backoffLimit"], job["activeDeadlineSeconds"], job["suspend"]) == (1, 600, True)
    default = rendered()["Job"]["spec"]
    assert default["backoffLimit"] == 3
    assert default["suspend"] is False
    assert "activeDeadlineSeconds" not in default


def test_queued_job_is_created_suspended_with_the_kueue_label() -> None:
    job = rendered(spec_of(scheduling={"queueName": "gpu-queue"}))["Job"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True


def test_a_queued_job_created_suspended_is_not_handed_to_its_queue_yet() -> None:
    spec = spec_of(scheduling={"queueName": "gpu-queue"}, runPolicy={"suspend": True})
    job = rendered(spec)["Job"]
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]  # Kueue would admit it
    assert job["spec"]["suspend"] is True


def test_scheduling_reaches_the_pod() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}}
    spec = spec_of(
        scheduling={
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "affinity": affinity,
            "priorityClassName": "training",
        }
    )
    pod = pod_spec(rendered(spec))
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["affinity"] == affinity
    assert pod["priorityClassName"] == "training"


def test_long_names_are_shortened_to_valid_labels_and_stay_stable() -> None:
    name = "x" * 100
    assert len(short_name(name)) == 63
    assert short_name(name) == short_name(name)
    assert short_name(name) != short_name("x" * 99 + "y")
    assert child_names(name).job == short_name(name)
    objects = render(spec_of(), {**METADATA, "name": name}, OperatorSettings())
    job = next(o for o in objects if o["kind"] == "Job")
    assert len(job["metadata"]["labels"]["kubetune.io/job"]) <= 63
    assert job["metadata"]["annotations"]["kubetune.io/finetunejob"] == name


def test_rendering_is_deterministic() -> None:
    assert render(spec_of(), METADATA, OperatorSettings()) == render(
        spec_of(), METADATA, OperatorSettings()
    )


def test_settings_read_lists_from_comma_separated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_NAMESPACES", "team-a, team-b")
    monkeypatch.setenv("KUBETUNE_DENIED_OPTIONS", "trustRemoteCode,pushToHub")
    monkeypatch.setenv("KUBETUNE_RUN_AS_USER", "")
    settings = OperatorSettings()
    assert settings.namespaces == ["team-a", "team-b"]
    assert settings.denied_options == ["trustRemoteCode", "pushToHub"]
    assert settings.run_as_user is None


def group_spec(nodes: int = 2, **resources: Any) -> FineTuneJobSpec:
    return spec_of(resources={"gpus": 1, "nodes": nodes, **resources})


def test_two_nodes_render_an_indexed_job_of_two_pods_named_by_a_headless_service() -> None:
    objects = render(group_spec(), METADATA, OperatorSettings(), attempt=3)
    kinds = [obj["kind"] for obj in objects]
    assert kinds == ["ConfigMap", "NetworkPolicy", "NetworkPolicy", "Service", "Job"]
    by_kind = {obj["kind"]: obj for obj in objects}
    job, service = by_kind["Job"], by_kind["Service"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (2, 2)
    # The first pod lost fails this attempt's Job; the operator starts the next as a new Job.
    assert job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["annotations"]["kubetune.io/attempt"] == "3"
    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"]["values"] == [2, 3, 4, 5, 6]

    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {
        "kubetune.io/job-uid": "uid-1234",
        "app.kubernetes.io/managed-by": "kubetune-operator",
    }
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-1234"
    assert pod_spec(by_kind)["subdomain"] == service["metadata"]["name"] == "llama2-support"

    env = {e["name"]: e for e in trainer(by_kind)["env"]}
    assert env["KUBETUNE_RENDEZVOUS_ENDPOINT"]["value"] == "llama2-support-0.llama2-support:29400"
    assert env["KUBETUNE_RENDEZVOUS_ID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/controller-uid']"}
    }
    # Four GPUs per pod: every pod asks for its own four.
    four = render(group_spec(gpus=4), METADATA, OperatorSettings())
    limits = trainer({o["kind"]: o for o in four})["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "4"


def test_one_node_stays_a_single_pod_job_without_a_service_or_rendezvous() -> None:
    objects = rendered(spec_of(resources={"gpus": 2}))
    job = objects["Job"]
    assert "Service" not in objects
    assert "completionMode" not in job["spec"]
    assert (job["spec"]["completions"], job["spec"]["backoffLimit"]) == (1, 3)
    assert "subdomain" not in pod_spec(objects)
    names = {e["name"] for e in trainer(objects)["env"]}
    assert not names & {"KUBETUNE_RENDEZVOUS_ENDPOINT", "KUBETUNE_RENDEZVOUS_ID"}
    assert trainer(objects)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "ingress" not in objects["NetworkPolicy"]["spec"]


def test_a_groups_pods_reach_each_other_and_no_other_pod() -> None:
    """The namespace's policy lets no pod reach another; a group's own policy adds its pods,
    and only them, selected by the job's uid (whatever the egress settings say)."""
    shared, group = [
        o["spec"] for o in render(group_spec(), METADATA, OperatorSettings())
        if o["kind"] == "NetworkPolicy"
    ]  # fmt: skip
    assert "ingress" not in shared
    assert not any("podSelector" in peer and "namespaceSelector" not in peer
                   for rule in shared["egress"] for peer in rule["to"])  # fmt: skip
    peers = [{"podSelector": {"matchLabels": {
        "kubetune.io/job-uid": "uid-1234", "app.kubernetes.io/managed-by": "kubetune-operator"}}}]  # fmt: skip
    assert group["podSelector"] == peers[0]["podSelector"]
    assert group["ingress"] == [{"from": peers}]
    assert group["egress"] == [{"to": peers}]
    only_dns = rendered(group_spec(), trainer_egress_cidrs=[])["NetworkPolicy"]["spec"]
    assert only_dns["egress"] == [{"to": peers}]


def test_two_jobs_whose_names_shorten_alike_never_select_each_others_pods() -> None:
    """``kubetune.io/job`` is the name shortened to 63 characters: a second job of the namespace
    named so that it shortens alike must not join the first one's NetworkPolicy peers or
    Service. Groups select by the FineTuneJob's uid."""
    long_name = "a" * 80
    twin = {**METADATA, "name": long_name, "uid": "uid-victim"}
    other = {**METADATA, "name": long_name, "uid": "uid-intruder"}
    victim = {o["kind"]: o for o in render(group_spec(), twin, OperatorSettings())}
    intruder = {o["kind"]: o for o in render(group_spec(), other, OperatorSettings())}
    intruder_pod_labels = intruder["Job"]["spec"]["template"]["metadata"]["labels"]
    victim_pod_labels = victim["Job"]["spec"]["template"]["metadata"]["labels"]
    assert intruder_pod_labels["kubetune.io/job"] == victim_pod_labels["kubetune.io/job"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return selector.items() <= labels.items()

    policy = victim["NetworkPolicy"]["spec"]
    for selector in (
        policy["podSelector"]["matchLabels"],
        policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"],
        victim["Service"]["spec"]["selector"],
    ):
        assert selects(selector, victim_pod_labels)
        assert not selects(selector, intruder_pod_labels)
    # A pod template's labels can't claim another job's uid: kubetune's labels win.
    forged = group_spec().model_copy(
        update={"pod_template": PodTemplateOverrides.model_validate(
            {"metadata": {"labels": {"kubetune.io/job-uid": "uid-victim"}}})}
    )  # fmt: skip
    forged_job = render(forged, other, OperatorSettings(
        allowed_pod_template_fields=["metadata.labels"]))[-1]  # fmt: skip
    assert forged_job["spec"]["template"]["metadata"]["labels"]["kubetune.io/job-uid"] == (
        "uid-intruder"
    )


def test_a_groups_host_names_stay_dns_labels_for_long_names() -> None:
    long_name = "a" * 63
    names = child_names(long_name, nodes=64)
    assert len(f"{names.job}-63") <= 63
    assert child_names("7b-run", nodes=2).service == "g-7b-run"
    objects = render(group_spec(), {**METADATA, "name": long_name}, OperatorSettings())
    job = next(o for o in objects if o["kind"] == "Job")
    assert len(f"{job['metadata']['name']}-1") <= 63


def validation_children(spec: FineTuneJobSpec | None = None) -> list[dict[str, Any]]:
    settings = OperatorSettings(trainer_network_policy=True)
    return render_validation(spec or spec_of(resources={"gpus": 2}), METADATA, settings)


def test_validation_job_runs_the_preflight_without_a_gpu_under_the_same_pod_policy() -> None:
    *companions, validation = validation_children()
    trainer_job = rendered(spec_of(resources={"gpus": 2}), trainer_network_policy=True)["Job"]
    assert [c["kind"] for c in companions] == ["ConfigMap", "NetworkPolicy"]
    assert validation["metadata"]["name"] == "llama2-support-validate"
    pod = validation["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:2] == ["kubetune-trainer", "preflight"]
    assert (
        container["command"][2:]
        == trainer_job["spec"]["template"]["spec"]["containers"][0]["command"][1:]
    )
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    trainer_pod = trainer_job["spec"]["template"]["spec"]
    assert pod["securityContext"] == trainer_pod["securityContext"]
    assert container["securityContext"] == trainer_pod["containers"][0]["securityContext"]
    assert pod["serviceAccountName"] == trainer_pod["serviceAccountName"]
    assert pod["automountServiceAccountToken"] is False
    assert container["image"] == trainer_pod["containers"][0]["image"]
    assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"].startswith("pvc-"))
    labels = validation["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "validator"
    assert validation["spec"]["completions"] == 1


def test_validation_job_is_not_queued_and_suspends_with_the_run() -> None:
    spec = spec_of(scheduling={"queueName": "gpus"}, runPolicy={"suspend": True})
    validation = validation_children(spec)[-1]
    assert "kueue.x-k8s.io/queue-name" not in validation["metadata"]["labels"]
    assert validation["spec"]["suspend"] is True


def test_mlflow_credentials_come_from_secrets_by_reference_and_never_sit_in_the_config() -> None:
    spec = spec_of(
        tracking={
            "mlflow": {
                "trackingUri": "https://mlflow.example.com/team-a",
                "experimentName": "support",
                "usernameSecretRef": {"name": "mlflow-auth", "key": "user"},
                "passwordSecretRef": {"name": "mlflow-auth", "key": "password"},
            },
            "tensorboard": {"enabled": True},
        }
    )
    objects = rendered(spec)
    env = {e["name"]: e for e in trainer(objects)["env"]}
    assert env["MLFLOW_TRACKING_USERNAME"] == {
        "name": "MLFLOW_TRACKING_USERNAME",
        "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": "user"}},
    }
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlflow-auth",
        "key": "password",
    }
    assert "MLFLOW_TRACKING_TOKEN" not in env
    config = TrainerConfig.model_validate(
        yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    )
    assert config.spec.tracking == spec.tracking  # the references, by name
    bearer = spec_of(
        tracking={
            "mlflow": {
                "trackingUri": "http://mlflow.mlops:5000",
                "experimentName": "support",
                "tokenSecretRef": {"name": "mlflow-token", "key": "token"},
            }
        }
    )
    env = {e["name"]: e for e in trainer(rendered(bearer))["env"]}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-token"
    assert "MLFLOW_TRACKING_PASSWORD" not in env


# --- a group as a JobSet (KUBETUNE_GROUP_WORKLOAD=jobset, JobSet's CRD served) -------------------


def jobset_children(spec: FineTuneJobSpec | None = None, **settings: Any) -> list[dict[str, Any]]:
    return render(spec or group_spec(), METADATA, OperatorSettings(**settings), jobset=True)


def test_a_group_as_a_jobset_is_one_replicated_job_whose_template_is_the_indexed_job() -> None:
    objects = jobset_children(group_spec(), trainer_network_policy=True)
    kinds = [obj["kind"] for obj in objects]
    # JobSet makes the headless Service: kubetune makes none.
    assert kinds == ["ConfigMap", "NetworkPolicy", "NetworkPolicy", "JobSet"]
    jobset = objects[-1]
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert jobset["metadata"]["name"] == "llama2-support"
    assert jobset["metadata"]["ownerReferences"][0]["uid"] == "uid-1234"
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert (replicated["name"], replicated["replicas"]) == ("node", 1)
    indexed = next(
        o for o in render(group_spec(), METADATA, OperatorSettings()) if o["kind"] == "Job"
    )
    template = replicated["template"]
    expected = {k: v for k, v in indexed["spec"].items() if k != "suspend"}
    expected["template"]["spec"]["subdomain"] = "llama2-support"
    env = expected["template"]["spec"]["containers"][0]["env"]
    endpoint = next(e for e in env if e["name"] == "KUBETUNE_RENDEZVOUS_ENDPOINT")
    endpoint["value"] = "llama2-support-node-0-0.llama2-support:29400"
    assert template["spec"] == expected
    # The child Job is found by the operator's labels and annotation; it counts no attempts.
    assert template["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
    assert template["metadata"]["annotations"] == {"kubetune.io/finetunejob": "llama2-support"}


def test_a_jobsets_defaults_are_explicit_and_its_failure_policy_is_the_groups() -> None:
    spec = spec_of(resources={"gpus": 1, "nodes": 2}, runPolicy={"backoffLimit": 5})
    jobset = jobset_children(spec)[-1]["spec"]
    # What JobSet's defaulting webhook would set, set here (the local cluster runs none).
    assert jobset["network"] == {"enableDNSHostnames": True, "subdomain": "llama2-support",
                                 "publishNotReadyAddresses": True}  # fmt: skip
    assert jobset["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["node"]}
    assert jobset["startupPolicy"] == {"startupPolicyOrder": "AnyOrder"}
    job = jobset["replicatedJobs"][0]["template"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    # The whole group restarts up to backoffLimit times; a non-retriable exit or the deadline
    # fails the JobSet at once.
    assert jobset["failurePolicy"] == {
        "maxRestarts": 5,
        "restartStrategy": "Recreate",
        "rules": [{"name": "non-retriable", "action": "FailJobSet",
                   "onJobFailureReasons": ["PodFailurePolicy", "DeadlineExceeded"],
                   "targetReplicatedJobs": ["node"]}],
    }  # fmt: skip
    assert job["backoffLimit"] == 0
    assert jobset["suspend"] is False


def test_a_queued_jobset_is_created_suspended_and_only_the_jobset_names_the_queue() -> None:
    spec = spec_of(resources={"gpus": 1, "nodes": 2}, scheduling={"queueName": "gpu-queue"})
    jobset = jobset_children(spec)[-1]
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert jobset["spec"]["suspend"] is True
    template = jobset["spec"]["replicatedJobs"][0]["template"]
    assert "kueue.x-k8s.io/queue-name" not in template["metadata"]["labels"]
    assert "kueue.x-k8s.io/queue-name" not in template["spec"]["template"]["metadata"]["labels"]
    suspended = jobset_children(spec_of(resources={"gpus": 1, "nodes": 2},
                                        runPolicy={"suspend": True}))[-1]  # fmt: skip
    assert suspended["spec"]["suspend"] is True


def test_one_pod_stays_a_job_and_validation_makes_no_service_when_jobset_runs_the_group() -> None:
    assert jobset_children(spec_of())[-1]["kind"] == "Job"
    validating = render_validation(group_spec(), METADATA, OperatorSettings(), jobset=True)
    assert [o["kind"] for o in validating] == ["ConfigMap", "NetworkPolicy", "NetworkPolicy", "Job"]
    assert "subdomain" not in validating[-1]["spec"]["template"]["spec"]


@pytest.mark.parametrize("nodes", [2, 16])
def test_a_jobsets_names_stay_within_what_its_webhook_checks_for_long_names(nodes: int) -> None:
    for name in ("a" * 63, "7b-" + "x" * 60):
        jobset = render(group_spec(nodes), {**METADATA, "name": name}, OperatorSettings(),
                        jobset=True)[-1]  # fmt: skip
        js_name = jobset["metadata"]["name"]
        assert js_name[0].isalpha() and jobset["spec"]["network"]["subdomain"] == js_name
        # JobSet's own check: the longest pod name, <jobset>-node-0-<last index>-<5>, is a DNS
        # label (so are the pods' host names, shorter by the suffix).
        assert len(f"{js_name}-node-0-{nodes - 1}-abcde") <= 63
        env = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
            "containers"][0]["env"]  # fmt: skip
        endpoint = next(e["value"] for e in env if e["name"] == "KUBETUNE_RENDEZVOUS_ENDPOINT")
        assert endpoint == f"{js_name}-node-0-0.{js_name}:29400"


def test_validation_pod_gets_the_operators_resources_and_deadline_whatever_the_spec_asks() -> None:
    spec = spec_of(
        resources={"gpus": 2, "cpu": "32", "memory": "256Gi"},
        runPolicy={"activeDeadlineSeconds": 86400},
        podTemplate={"spec": {"containers": [{"name": "trainer", "resources": {
            "requests": {"cpu": "64"}, "limits": {"ephemeral-storage": "1Ti"}}}]}},
    )  # fmt: skip
    settings = OperatorSettings(
        allowed_pod_template_fields=["containers.resources"],
        validation_cpu_request="500m",
        validation_cpu_limit="1",
        validation_memory_request="1Gi",
        validation_memory_limit="2Gi",
        validation_ephemeral_storage_request="1Gi",
        validation_ephemeral_storage_limit="5Gi",
        validation_active_deadline_seconds=600,
    )
    validation = render_validation(spec, METADATA, settings)[-1]

    (container,) = validation["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "1Gi"},
        "limits": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "5Gi"},
    }
    assert validation["spec"]["activeDeadlineSeconds"] == 600


def test_validation_pod_has_sensible_limits_by_default() -> None:
    validation = validation_children()[-1]

    (container,) = validation["spec"]["template"]["spec"]["containers"]
    for amounts in (container["resources"]["requests"], container["resources"]["limits"]):
        assert set(amounts) == {"cpu", "memory", "ephemeral-storage"}  # never BestEffort
    assert validation["spec"]["activeDeadlineSeconds"] > 0


def test_validation_pod_carries_the_model_token_but_no_push_or_tracking_credentials() -> None:
    spec = spec_of(
        output={"uri": "pvc://adapters/x", "pushToHub": {
            "repoId": "org/x", "tokenSecretRef": {"name": "hub-write", "key": "token"}}},
        tracking={"mlflow": {
            "trackingUri": "https://mlflow.example.com", "experimentName": "e",
            "usernameSecretRef": {"name": "mlflow-auth", "key": "user"},
            "passwordSecretRef": {"name": "mlflow-auth", "key": "password"},
            "tokenSecretRef": {"name": "mlflow-auth", "key": "token"}}},
    )  # fmt: skip
    trainer_env = {e["name"] for e in trainer(rendered(spec))["env"]}
    validation = validation_children(spec)[-1]

    (container,) = validation["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert {"HF_PUSH_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN"} <= trainer_env  # fmt: skip
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in env.values() if "valueFrom" in e}
    assert secrets == {"hf-token"}


def test_object_store_keys_come_from_secrets_by_reference_to_trainer_and_validation_pods() -> None:
    spec = spec_of(
        dataset={"uri": "s3://team-a/data/support.jsonl"},
        output={"uri": "s3://team-a/adapters/support"},
        objectStore={
            "endpoint": "https://minio.storage.example:9000",
            "region": "eu-west-1",
            "accessKeyIdSecretRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"},
            "secretAccessKeySecretRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"},
        },
    )
    objects = rendered(spec)
    (validation,) = validation_children(spec)[-1]["spec"]["template"]["spec"]["containers"]
    for container in (trainer(objects), validation):  # the preflight reads the dataset too
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
            "name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}  # fmt: skip
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}  # fmt: skip
        assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.storage.example:9000"
        assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
        assert "AWS_SESSION_TOKEN" not in env
    assert "AWS_ACCESS_KEY_ID" not in {e["name"] for e in trainer(rendered(spec_of()))["env"]}
