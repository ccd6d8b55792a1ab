"""A FineTuneJob whose trainer pod runs on a real node (``real_node``: the upstream kubelet with
containerd and runc), where its memory limit and security context are enforced: when it
outgrows its memory limit the job ends ``Failed`` with reason ``OOMKilled``; the NetworkPolicy
the operator gives it keeps it from an address its settings exclude, and the trainer's own
process finds itself the chart's non-root uid with no capabilities. Progress crosses from the
real node's pod to the operator on the host through a Service (``host_service``).

The operator runs as a process beside the cluster (``OperatorProcess``) with the trainer's
security context at the chart's defaults. The trainer image is the operator image (``make images``
builds it in minutes; the trainer's is GBs of CUDA): the trainer's command is a stand-in put on
the job's claim, which starts kubetune's own reporter, waits for the test's word, then
allocates until the kernel kills it.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from operatorkit import (
    CLAIM,
    CRD,
    OperatorProcess,
    host_service,
    log_tail_after,
    started,
    work_claim,
)

from kubetune.local.ports import free_port
from kubetune_devtools.installs import project_version, real_node_state
from kubetune_devtools.pytest_plugin import (
    ECHO_SERVER,
    ClusterHandle,
    Kubectl,
    apply,
    get_json,
    install_crd,
    minimal_finetunejob,
    on_real_node,
    pod_ip_once_running,
    python_pod_on_real_node,
    run_to_end,
    wait_for,
)

pytestmark = pytest.mark.integration

CHART_VALUES = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "values.yaml"

STAND_IN = "stand-in-trainer"
#: Written by the test once it has seen the stand-in's progress: the stand-in then outgrows its
#: memory limit.
GO = "outgrow-the-limit"
#: In the stand-in's env (spec.podTemplate): an address to connect to instead of training; what
#: answered goes to PROBED on the claim.
PROBE_ENV = "STAND_IN_PROBE"
PROBED = "probed.json"
STAND_IN_SOURCE = f"""#!/usr/bin/env python3
import os, sys, time
from kubetune.api.config import load_trainer_config
from kubetune.api.models import Progress
from kubetune.api.timestamps import rfc3339
from kubetune.trainer.run.progress import reporter_from_settings

here = os.path.dirname(os.path.abspath(__file__))
probe = os.environ.get("{PROBE_ENV}")
if probe:
    # Until the pod's policy holds (within a deadline), then once more: what answered.
    import json, socket

    def ask(address):
        try:
            with socket.create_connection((address, 8080), 3) as connection:
                return connection.recv(100).decode()
        except OSError as error:
            return type(error).__name__

    deadline = time.monotonic() + 60
    while (answer := ask(probe)) == "echo" and time.monotonic() < deadline:
        time.sleep(0.5)
    # Who the trainer's process is, as the kernel sees it.
    status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())

    def writes(folder):
        try:
            with open(os.path.join(folder, "probe-write"), "w"):
                return "written"
        except OSError as error:
            return type(error).__name__ + ":" + str(error.errno)

    with open(os.path.join(here, "{PROBED}"), "w") as out:
        json.dump({{"answer": answer, "uid": os.getuid(), "groups": sorted(os.getgroups()),
                   "CapEff": status["CapEff"].strip(), "CapPrm": status["CapPrm"].strip(),
                   "NoNewPrivs": status["NoNewPrivs"].strip(), "root": writes("/opt"),
                   "tmp": writes("/tmp"), "home": writes(os.environ["HOME"])}}, out)
    sys.exit(0)
config = load_trainer_config(sys.argv[sys.argv.index("--config") + 1])
reporter = reporter_from_settings(config.progress, config.job)
reporter.report(Progress(step=3, total_steps=12, percent=25.0, loss=1.25, updated_at=rfc3339()))
go = os.path.join(here, "{GO}")
while not os.path.exists(go):
    time.sleep(0.2)
blocks = []
while True:
    blocks.append(bytearray(16 * 1024 * 1024))
"""


ASK = """
import socket, sys
with socket.create_connection((sys.argv[1], 8080), 10) as connection:
    open("/dev/termination-log", "w").write(connection.recv(100).decode())
"""


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl,
    local_cluster: ClusterHandle,
    kubeconfig_path: Path,
    real_node: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    install_crd(kubectl, CRD)
    trainer = chart_trainer_values()
    env = {
        # The chart's trainer security context (non-root uid and fsGroup): the real node
        # enforces it.
        "KUBETUNE_RUN_AS_NON_ROOT": str(trainer["runAsNonRoot"]).lower(),
        "KUBETUNE_RUN_AS_USER": str(trainer["runAsUser"]),
        "KUBETUNE_FS_GROUP": str(trainer["fsGroup"]),
        "KUBETUNE_TRAINER_IMAGE": f"kubetune/operator:{project_version()}",
        "KUBETUNE_IMAGE_PULL_POLICY": "Never",
        "KUBETUNE_TRAINER_COMMAND": f"/mnt/pvc/{CLAIM}/{STAND_IN}",
        # The probe's address reaches the stand-in through spec.podTemplate's env, which the
        # operator admits by name only.
        "KUBETUNE_ALLOWED_POD_TEMPLATE_ENV": f"KUBETUNE_STAND_IN,{PROBE_ENV}",
        # The trainers' NetworkPolicy (on by default) excludes, beside the cloud metadata
        # address, the real node's pods: the apiserver (through the kubernetes Service) and DNS
        # stay reachable.
        "KUBETUNE_TRAINER_EGRESS_EXCEPT": f"169.254.169.254/32,{real_node_pods(local_cluster)}",
    }
    log = tmp_path_factory.mktemp("operator") / "log"
    # The trainers report to this process of the host through a Service whose endpoint is the
    # host's side of the real node's link.
    port = free_port()
    host = real_node_state(local_cluster.local().layout.home).host_address
    address = host_service(kubectl, f"operator-progress-{port}", host, port)
    yield from started(
        OperatorProcess(kubeconfig_path, log, env=env, progress_port=port, progress_host=address)
    )
    kubectl("delete", "service", f"operator-progress-{port}", "-n", "default", check=False)


def chart_trainer_values() -> dict[str, Any]:
    """The chart's default ``trainer`` values."""
    return dict(yaml.safe_load(CHART_VALUES.read_text())["trainer"])


def real_node_pods(cluster: ClusterHandle) -> str:
    """The real node's pods' /24 (one per real node: see docs/local-cluster.md)."""
    return real_node_state(cluster.local().layout.home).pod_network


@pytest.fixture(autouse=True)
def _operator_log(operator: OperatorProcess) -> Iterator[None]:
    yield from log_tail_after(operator)


def stand_in_claim(kubectl: Kubectl, namespace: str) -> Path:
    """A bound claim ``work`` holding the stand-in trainer; the directory behind it."""
    directory = work_claim(kubectl, namespace)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o777)  # the trainer's uid 1000 writes its output there
    script = directory / STAND_IN
    script.write_text(STAND_IN_SOURCE)
    script.chmod(0o755)
    return directory


def stand_in_job(name: str, memory: str, **spec: Any) -> dict[str, Any]:
    """FineTuneJob ``name`` whose one trainer pod (``memory`` its limit; ``spec``'s other
    fields) runs the stand-in from the work claim on the real node, with no Validating phase
    and no retry."""
    return minimal_finetunejob(
        name,
        model={"uri": "org/model"},
        dataset={"uri": "https://datasets.invalid/train.jsonl"},
        output={"uri": f"pvc://{CLAIM}/adapter"},
        resources={"gpus": 1, "memory": memory, "cpu": "500m"},
        scheduling=on_real_node(),
        validation={"enabled": False},
        runPolicy={"backoffLimit": 0},
        **spec,
    )


def status_of(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return dict(get_json(kubectl, "ftj", name, "-n", namespace).get("status") or {})


def test_a_trainer_over_its_memory_limit_fails_the_job_oom_killed(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, real_node: str
) -> None:
    directory = stand_in_claim(kubectl, namespace)
    job = stand_in_job("outgrows-memory", "128Mi")
    apply(kubectl, namespace, job)

    # The stand-in's report crossed from the real node's pod to the operator on the host.
    wait_for(
        lambda: (
            (status_of(kubectl, namespace, "outgrows-memory").get("progress") or {}).get("step")
            == 3
        ),
        120,
        "the trainer's progress",
    )

    (directory / GO).touch()
    status = wait_for(
        lambda: (
            s
            if (s := status_of(kubectl, namespace, "outgrows-memory")).get("phase") == "Failed"
            else None
        ),
        120,
        "the job to fail",
    )
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "OOMKilled"), json.dumps(status)
    pod = get_json(kubectl, "pod", status["podName"], "-n", namespace)
    assert pod["spec"]["nodeName"] == real_node
    (trainer,) = pod["status"]["containerStatuses"]
    assert trainer["state"]["terminated"]["reason"] == "OOMKilled"


def test_a_trainer_never_reaches_an_address_its_network_policy_excludes(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, real_node: str
) -> None:
    """The trainer's NetworkPolicy, rendered by the operator, enforced on the real node: the
    trainer connects to a pod of the excluded range and gets no answer, where a pod without
    that policy gets one."""
    directory = stand_in_claim(kubectl, namespace)
    apply(kubectl, namespace, python_pod_on_real_node("echo", ECHO_SERVER))
    address = pod_ip_once_running(kubectl, namespace, "echo", 120, "the echo server to run")
    trainer_env = [{"name": PROBE_ENV, "value": address}]
    job = stand_in_job(
        "probes",
        "256Mi",
        podTemplate={"spec": {"containers": [{"name": "trainer", "env": trainer_env}]}},
    )
    apply(kubectl, namespace, job)

    probed = wait_for(
        lambda: (directory / PROBED).is_file() and json.loads((directory / PROBED).read_text()),
        180,
        "the trainer's probe",
    )
    # Dropped or rejected, as the enforcer chooses; never answered.
    assert probed["answer"] in ("TimeoutError", "ConnectionRefusedError"), probed
    # The trainer's own process: the chart's non-root uid, its fsGroup, no capabilities, no way
    # to gain any, a read-only root (EROFS) with /tmp and its HOME writable.
    assert probed["root"] == f"OSError:{errno.EROFS}", probed
    assert probed["tmp"] == probed["home"] == "written", probed
    trainer = chart_trainer_values()
    assert probed["uid"] == trainer["runAsUser"] != 0, probed
    assert trainer["fsGroup"] in probed["groups"], probed
    assert probed["CapEff"] == probed["CapPrm"] == "0000000000000000", probed
    assert probed["NoNewPrivs"] == "1", probed
    # The server answers a pod that no policy holds.
    ended = run_to_end(kubectl, namespace, python_pod_on_real_node("asks", ASK, address), 120)
    (state,) = ended["status"]["containerStatuses"]
    assert state["state"]["terminated"].get("message") == "echo", state
