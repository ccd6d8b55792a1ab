"""The operator's control path side by side with a replay floor and JobSet's controller (not a
test: it prints figures; the table and how it was run are in docs/performance.md).

One local cluster (``kubetune.local``, one node agent). The control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, the node agent) and this driver run on CPU 0; the
controller under test runs alone on CPU 1 (``taskset``). Every run creates suspended objects
(nothing is scheduled: the control path only) at a fixed rate in a namespace of its own, and
measures create → Job (the driver's create returning → the Job's ``ADDED`` on its watch), none
lost or doubled (a census of the Jobs by owner), CPU seconds per job of each process, the
apiserver's requests per job (its own ``apiserver_request_total``, all clients) and the
controller's own, its RSS and (kubetune) queue depth over time:

* ``floor-step``: the replay floor — ``side_by_side.py replay``, a plain client with no operator
  that watches FineTuneJobs and makes, for each, the writes the operator makes (the same rendered
  ConfigMap and Job, the namespace's NetworkPolicy once, one status patch, one Event) — at rising
  rates: its saturation rate is the highest rate whose Jobs keep up (made ≥ 95% as fast as asked,
  p99 create → Job under ``--saturation-p99`` s).
* ``floor``: the replay floor at half its saturation rate (``--rate`` overrides).
* ``kubetune-validation-on`` / ``-off``: ``kubetune-operator`` under the chart's ServiceAccount,
  RBAC and admission policies (``helm template`` of charts/kubetune, applied; the operator runs
  with a token of that ServiceAccount and the Deployment's own environment), same rate, same
  count. The replay floor runs under the same token.
* ``jobset``: JobSet's controller (hack/jobset) handling as many suspended JobSets (one
  replicated Job of one pod), same rate.
* ``retained``: kubetune (validation on) until ``--retained`` FineTuneJobs exist, created as fast
  as it takes them; its RSS then.

    .venv/bin/python bench/side_by_side.py --jobs 600 --retained 10000 --out bench/results/X.json

The raw series (each job's delays, the samples) go to ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kubetune"
CRD = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
RELEASE, SYSTEM = "bench", "kubetune-system"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
OWNER_ANNOTATION = "kubetune.io/finetunejob"
CONTROL_CPU, CONTROLLER_CPU = 0, 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ftj_spec(validation: bool) -> dict[str, Any]:
    return {
        "model": {"uri": "org/model"},
        "dataset": {"uri": "https://datasets.invalid/train.jsonl"},
        "output": {"uri": "s3://bucket/adapter"},
        "resources": {"gpus": 0, "shmSize": "16Mi"},
        "runPolicy": {"suspend": True, "backoffLimit": 0},
        "validation": {"enabled": validation},
    }


def jobset_body(name: str) -> dict[str, Any]:
    """A suspended JobSet of one replicated Job of one pod, with every field JobSet's defaulting
    webhook would set (the local cluster registers no webhook), as kubetune renders its own."""
    container = {"name": "main", "image": "kubetune/trainer:bench", "command": ["sleep", "1"]}
    template = {"spec": {"restartPolicy": "Never", "containers": [container]}}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name},
        "spec": {
            "suspend": True,
            "network": {"enableDNSHostnames": True, "subdomain": name,
                        "publishNotReadyAddresses": True},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": ["node"]},
            "startupPolicy": {"startupPolicyOrder": "AnyOrder"},
            "failurePolicy": {"maxRestarts": 0, "restartStrategy": "Recreate"},
            "replicatedJobs": [
                {
                    "name": "node",
                    "replicas": 1,
                    "template": {
                        "spec": {
                            "parallelism": 1,
                            "completions": 1,
                            "backoffLimit": 0,
                            "completionMode": "Indexed",
                            "template": template,
                        }
                    },
                }
            ],
        },
    }  # fmt: skip


# --- processes: where they run, what they cost ------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a supervised process may run inside a sandbox's wrapper)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` and its descendants on ``cpu`` (threads made later inherit it)."""
    for member in tree(pid):
        subprocess.run(
            ["taskset", "-a", "-pc", str(cpu), str(member)], check=False, capture_output=True
        )


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of ``pid`` and its descendants."""
    total = 0.0
    for member in tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants."""
    total = 0.0
    for member in tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        return parse_metrics(response.read().decode())


def parse_metrics(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            try:
                samples[series] = float(value)
            except ValueError:
                continue
    return samples


def labels_of(series: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', series))


def apiserver_requests(bench: Bench) -> dict[str, float]:
    """The apiserver's ``apiserver_request_total`` by ``VERB resource[/sub]`` (watches, leases
    and the node's own heartbeats aside: none is a job's)."""
    text = bench.kubectl_run("get", "--raw", "/metrics")
    counts: dict[str, float] = {}
    for series, value in parse_metrics(text).items():
        if not series.startswith("apiserver_request_total{"):
            continue
        labels = labels_of(series)
        resource = labels.get("resource", "")
        if labels.get("verb") in ("WATCH", "WATCHLIST") or resource in ("leases", "nodes", ""):
            continue
        if labels.get("subresource"):
            resource += "/" + labels["subresource"]
        key = f"{labels.get('verb')} {resource}"
        counts[key] = counts.get(key, 0.0) + value
    return counts


def per_job(after: dict[str, float], before: dict[str, float], jobs: int) -> dict[str, float]:
    return {
        k: round((v - before.get(k, 0.0)) / jobs, 3)
        for k, v in sorted(after.items())
        if v - before.get(k, 0.0) > 0
    }


class Sampler:
    """Every ``period`` s: the controller's RSS and CPU, the apiserver's CPU, the load average,
    and whatever ``extra()`` returns (kubetune's queue depth)."""

    def __init__(
        self,
        pids: dict[str, int],
        period: float = 1.0,
        extra: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.pids, self.period, self.extra = pids, period, extra
        self.series: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            row: dict[str, Any] = {"t": round(time.monotonic() - self._start, 2)}
            for name, pid in self.pids.items():
                row[f"{name}_cpu_s"] = round(cpu_seconds(pid), 2)
                row[f"{name}_rss_mb"] = round(rss_mb(pid), 1)
            row["load1"] = os.getloadavg()[0]
            if self.extra is not None:
                with contextlib.suppress(OSError):
                    row.update(self.extra())
            self.series.append(row)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        return self.series


# --- watching what the controller makes --------------------------------------------------------


class Observer:
    """Watches one namespace's Jobs (and its FineTuneJobs' phases): when each owner's first Job
    was seen. Plain dicts, a dropped watch resumed from its resourceVersion."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.first_job: dict[str, float] = {}
        self.suspended: dict[str, float] = {}
        self._stop = threading.Event()
        custom = client.CustomObjectsApi(api)
        for args, handle in (
            (("batch", "v1", "jobs"), self._on_job),
            ((GROUP, VERSION, PLURAL), self._on_ftj),
        ):
            threading.Thread(target=self._watch, args=(custom, args, handle), daemon=True).start()

    def _watch(self, custom: Any, args: tuple[str, str, str], handle: Any) -> None:
        seen: str | None = None
        group, version, plural = args
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(
                    custom.list_namespaced_custom_object, group, version, self.namespace, plural,
                    timeout_seconds=60, resource_version=seen, allow_watch_bookmarks=True,
                ):  # fmt: skip
                    if event["type"] == "ERROR":
                        seen = None
                        break
                    seen = event["object"]["metadata"].get("resourceVersion", seen)
                    if event["type"] != "BOOKMARK":
                        handle(event["object"], time.monotonic())
            except Exception:  # a dropped watch is started again
                time.sleep(0.5)

    def _on_job(self, job: dict[str, Any], now: float) -> None:
        owner = owner_of(job)
        if owner:
            self.first_job.setdefault(owner, now)

    def _on_ftj(self, body: dict[str, Any], now: float) -> None:
        if (body.get("status") or {}).get("phase") == "Suspended":
            self.suspended.setdefault(body["metadata"]["name"], now)

    def stop(self) -> None:
        self._stop.set()


def owner_of(job: dict[str, Any]) -> str | None:
    metadata = job["metadata"]
    labels, annotations = metadata.get("labels") or {}, metadata.get("annotations") or {}
    return labels.get(JOBSET_LABEL) or annotations.get(OWNER_ANNOTATION)


def census(api: client.ApiClient, namespace: str, names: list[str]) -> dict[str, int]:
    """Owners with no Job (lost) or more than one (doubled)."""
    custom = client.CustomObjectsApi(api)
    counts = dict.fromkeys(names, 0)
    token = None
    while True:
        page = custom.list_namespaced_custom_object(
            "batch", "v1", namespace, "jobs", limit=500, _continue=token
        )
        for job in page["items"]:
            owner = owner_of(job)
            if owner in counts:
                counts[owner] += 1
        token = page["metadata"].get("continue")
        if not token:
            break
    return {
        "lost": sum(1 for c in counts.values() if c == 0),
        "doubled": sum(1 for c in counts.values() if c > 1),
    }


# --- one run -------------------------------------------------------------------------------------


def create_at_rate(
    make: Callable[[str], None], names: list[str], rate: float | None
) -> dict[str, float]:
    """``make(name)`` for each name, ``rate`` per second (None: as fast as 16 threads go)."""
    created: dict[str, float] = {}
    start = time.monotonic()

    def one(index: int, name: str) -> None:
        if rate:
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        make(name)
        created[name] = time.monotonic()

    pool = ThreadPoolExecutor(16)
    try:
        for future in [pool.submit(one, i, n) for i, n in enumerate(names)]:
            future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # an interrupted run creates no more
    return created


def wait_until(count: Callable[[], int], target: int, stall: float, what: str) -> None:
    """Until ``count()`` reaches ``target``; gives up when it stops growing for ``stall`` s."""
    moved, last = time.monotonic(), count()
    while last < target:
        time.sleep(0.5)
        value = count()
        if value != last:
            moved, last = time.monotonic(), value
        if time.monotonic() - moved > stall:
            print(f"  ! {what}: stuck at {last}/{target}", flush=True)
            return


def run(  # noqa: PLR0917 - one run's knobs
    bench: Bench,
    label: str,
    jobs: int,
    rate: float | None,
    make: Callable[[str, str], None],
    controller: dict[str, int],
    own_requests: Callable[[], dict[str, float]] | None = None,
    extra: Callable[[], dict[str, float]] | None = None,
    suspended: bool = False,
) -> dict[str, Any]:
    """Create ``jobs`` objects at ``rate`` in namespace ``bench-<label>`` (made already, or
    now); measure until each has its Job (and with ``suspended``, its status says so)."""
    namespace = f"bench-{label}"
    ensure_namespace(bench, namespace)
    observer = Observer(bench.admin, namespace)
    time.sleep(2)
    names = [f"{label[:20]}-{i:05d}" for i in range(jobs)]
    pids = {**controller, **bench.control_plane}
    cpu_before = {n: cpu_seconds(p) for n, p in pids.items()}
    api_before = apiserver_requests(bench)
    own_before = own_requests() if own_requests else {}
    sampler = Sampler(controller, 1.0, extra)
    started = time.monotonic()
    created = create_at_rate(lambda n: make(namespace, n), names, rate)
    created_in = max(created.values()) - started
    wait_until(lambda: len(observer.first_job), jobs, 120, f"{label}: Jobs")
    if suspended:
        wait_until(lambda: len(observer.suspended), jobs, 60, f"{label}: Suspended")
    elapsed = time.monotonic() - started
    time.sleep(2)  # the last status writes and Events land in the counts
    series = sampler.stop()
    cpu = {n: round(cpu_seconds(p) - cpu_before[n], 2) for n, p in pids.items()}
    api = per_job(apiserver_requests(bench), api_before, jobs)
    to_job = {n: observer.first_job[n] - created[n] for n in names if n in observer.first_job}
    to_suspended = {n: observer.suspended[n] - created[n] for n in names if n in observer.suspended}
    observer.stop()
    counted = census(bench.admin, namespace, names)
    delays = list(to_job.values())
    result: dict[str, Any] = {
        "label": label,
        "jobs": jobs,
        "rate_asked": rate,
        "rate_created": round(jobs / created_in, 2),
        "jobs_made_per_second": round(len(delays) / elapsed, 2) if elapsed else None,
        "create_to_job_p50_s": round(percentile(delays, 50), 4),
        "create_to_job_p99_s": round(percentile(delays, 99), 4),
        "create_to_job_max_s": round(max(delays, default=float("nan")), 4),
        "create_to_suspended_p99_s": round(percentile(list(to_suspended.values()), 99), 4),
        "cpu_seconds": cpu,
        "cpu_ms_per_job": {n: round(1000 * s / jobs, 2) for n, s in cpu.items()},
        "apiserver_requests_per_job": api,
        "apiserver_requests_per_job_total": round(sum(api.values()), 2),
        "wall_seconds": round(elapsed, 1),
        **counted,
        "load_average_mean": round(sum(r["load1"] for r in series) / max(1, len(series)), 2),
        "series": series,
        "create_to_job_s": {n: round(d, 4) for n, d in to_job.items()},
    }
    if own_requests is not None:
        own = per_job(own_requests(), own_before, jobs)
        result["controller_requests_per_job"] = own
        result["controller_requests_per_job_total"] = round(sum(own.values()), 2)
    for name, pid in controller.items():
        result[f"{name}_rss_mb_end"] = round(rss_mb(pid), 1)
    summary = {k: v for k, v in result.items() if k not in ("series", "create_to_job_s")}
    print(json.dumps(summary), flush=True)
    return result


def ensure_namespace(bench: Bench, namespace: str) -> None:
    try:
        client.CoreV1Api(bench.admin).create_namespace({"metadata": {"name": namespace}})
    except client.ApiException as exc:
        if exc.status != 409:
            raise


# --- the bench -------------------------------------------------------------------------------


class Bench:
    def __init__(self, home: Path, kubeconfig: Path, cluster: Any, kubectl: Path) -> None:
        self.home, self.kubeconfig, self.cluster, self.kubectl = home, kubeconfig, cluster, kubectl
        self.admin = config.new_client_from_config(str(kubeconfig))
        self.control_plane = {
            n: p for n, p in cluster.running().items() if p is not None and "node" not in n
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def kubectl_run(self, *args: str, input: str | None = None) -> str:
        result = subprocess.run(
            [str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args)}: {result.stderr}")
        return result.stdout

    def start(self, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        with (self.home / log).open("ab") as out:
            process = subprocess.Popen(
                ["taskset", "-c", str(CONTROLLER_CPU), *argv],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes.append(process)
        (self.home / f"{log}.pid").write_text(f"{process.pid}\n")
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def chart(bench: Bench, helm: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The chart's objects (applied, the Deployment aside) and the Deployment."""
    rendered = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "--namespace", SYSTEM],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    return [d for d in docs if d["kind"] not in ("Deployment", "PodDisruptionBudget")], deployment


def chart_operator_env(
    bench: Bench, deployment: dict[str, Any], secret: dict[str, Any]
) -> dict[str, str]:
    """The Deployment's environment, with what only a pod has (its name, the mounted TLS files,
    the kubeconfig from its token) made for a process on this host."""
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]]
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
    tls = bench.home / "progress-tls"
    tls.mkdir(exist_ok=True)
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (tls / key).write_bytes(base64.b64decode(secret["data"][key]))
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    token = bench.kubectl_run("create", "token", account, "-n", SYSTEM, "--duration", "6h").strip()
    admin = yaml.safe_load(bench.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    kubeconfig = bench.home / "operator.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa"}}],
    }))  # fmt: skip
    from kubetune.local.ports import free_port

    metrics_port = free_port()
    env.update(
        KUBECONFIG=str(kubeconfig),
        POD_NAME="bench-operator",
        POD_NAMESPACE=SYSTEM,
        KUBETUNE_LIVENESS_ENDPOINT=f"http://127.0.0.1:{free_port()}/healthz",
        KUBETUNE_METRICS_PORT=str(metrics_port),
        KUBETUNE_METRICS_AUTH="false",  # the bench reads /metrics without a token
        KUBETUNE_PROGRESS_PORT=str(free_port()),
        KUBETUNE_PROGRESS_TLS_CERT_FILE=str(tls / "tls.crt"),
        KUBETUNE_PROGRESS_TLS_KEY_FILE=str(tls / "tls.key"),
        KUBETUNE_PROGRESS_CA_BUNDLE=(tls / "ca.crt").read_text(),
        KUBETUNE_JSON_LOGS="false",
        PATH=os.environ["PATH"],
        HOME=os.environ.get("HOME", "/root"),
    )
    return env


def operator_requests(port: int) -> Callable[[], dict[str, float]]:
    def read() -> dict[str, float]:
        counts: dict[str, float] = {}
        for series, value in scrape(f"http://127.0.0.1:{port}/metrics").items():
            if series.startswith("kubetune_api_requests_total{"):
                labels = labels_of(series)
                if labels.get("resource") in ("leases", "tokenreviews"):
                    continue
                key = f"{labels.get('verb')} {labels.get('resource')}"
                counts[key] = counts.get(key, 0.0) + value
        return counts

    return read


def queue_depth(port: int) -> Callable[[], dict[str, float]]:
    def read() -> dict[str, float]:
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        return {"queue_depth": samples.get("kubetune_workqueue_depth", float("nan"))}

    return read


def wait_leader(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if scrape(f"http://127.0.0.1:{port}/metrics").get("kubetune_leader") == 1.0:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the operator never took its Lease")


def ftj_maker(bench: Bench, validation: bool) -> Callable[[str, str], None]:
    custom = client.CustomObjectsApi(bench.admin)
    spec = ftj_spec(validation)

    def make(namespace: str, name: str) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob",
                "metadata": {"name": name}, "spec": spec}  # fmt: skip
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    return make


def jobset_maker(bench: Bench) -> Callable[[str, str], None]:
    custom = client.CustomObjectsApi(bench.admin)

    def make(namespace: str, name: str) -> None:
        custom.create_namespaced_custom_object(
            "jobset.x-k8s.io", "v1alpha2", namespace, "jobsets", jobset_body(name)
        )

    return make


# --- the replay floor (its own process, on the controller's CPU) -------------------------------


def replay(kubeconfig: Path, namespace: str, validation: bool, counts_file: Path) -> None:
    """Watch the namespace's FineTuneJobs; for each new one make the operator's writes: the
    rendered ConfigMap and (validation) Job, the namespace's NetworkPolicy once (a GET, a
    POST), one status patch (Suspended), one Event. No indexes, no queue, no planning."""
    from kubetune.api.models import FineTuneJobSpec
    from kubetune.operator.render import render, render_validation
    from kubetune.operator.settings import OperatorSettings

    settings = OperatorSettings()
    api = config.new_client_from_config(str(kubeconfig))
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    batch, net = client.BatchV1Api(api), client.NetworkingV1Api(api)
    counts: dict[str, int] = {}
    lock = threading.Lock()
    policy_made = threading.Event()

    def count(kind: str) -> None:
        with lock:
            counts[kind] = counts.get(kind, 0) + 1

    def handle(ftj: dict[str, Any]) -> None:
        meta = ftj["metadata"]
        spec = FineTuneJobSpec.model_validate(ftj["spec"])
        metadata = {"name": meta["name"], "namespace": namespace, "uid": meta["uid"]}
        made = (render_validation if validation else render)(spec, metadata, settings)
        *companions, job = made
        for manifest in companions:
            if manifest["kind"] == "ConfigMap":
                core.create_namespaced_config_map(namespace, manifest)
                count("POST configmaps")
            elif manifest["kind"] == "NetworkPolicy" and not policy_made.is_set():
                policy_made.set()
                count("GET networkpolicies")
                try:
                    net.read_namespaced_network_policy(manifest["metadata"]["name"], namespace)
                except client.ApiException:
                    net.create_namespaced_network_policy(namespace, manifest)
                    count("POST networkpolicies")
        batch.create_namespaced_job(namespace, job)
        count("POST jobs")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        condition = {"status": "True", "lastTransitionTime": stamp, "observedGeneration": 1}
        status = {"status": {
            "phase": "Suspended", "observedGeneration": 1,
            "conditions": [
                {**condition, "type": "Suspended", "reason": "Suspended",
                 "message": "runPolicy.suspend is true"},
                {**condition, "type": "Ready", "status": "False", "reason": "Suspended",
                 "message": "suspended"},
            ],
        }}  # fmt: skip
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, meta["name"], status
        )
        count("PATCH finetunejobs/status")
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob",
                               "name": meta["name"], "namespace": namespace, "uid": meta["uid"]},
            "type": "Normal", "reason": "Suspended", "message": "suspended",
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "source": {"component": "bench-replay"},
        }  # fmt: skip
        core.create_namespaced_event(namespace, event)
        count("POST events")

    def write_counts() -> None:
        while True:
            with lock:
                counts_file.write_text(json.dumps(counts))
            time.sleep(0.5)

    threading.Thread(target=write_counts, daemon=True).start()
    pool = ThreadPoolExecutor(20)
    seen: str | None = None
    while True:
        try:
            for event in watch.Watch().stream(
                custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                timeout_seconds=300, resource_version=seen, allow_watch_bookmarks=True,
            ):  # fmt: skip
                if event["type"] == "ERROR":
                    seen = None
                    break
                body = event["object"]
                seen = body["metadata"].get("resourceVersion", seen)
                if event["type"] == "ADDED" and not body.get("status"):
                    pool.submit(handle, body)
        except Exception:  # a dropped watch is started again
            time.sleep(0.5)


def replay_process(
    bench: Bench, env: dict[str, str], namespace: str, validation: bool
) -> tuple[subprocess.Popen[bytes], Path]:
    counts = bench.home / f"replay-{namespace}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "replay",
            "--kubeconfig", env["KUBECONFIG"], "--namespace", namespace,
            "--validation", "on" if validation else "off", "--counts", str(counts)]  # fmt: skip
    process = bench.start(argv, env, f"replay-{namespace}.log")
    return process, counts


def replay_requests(counts: Path) -> Callable[[], dict[str, float]]:
    def read() -> dict[str, float]:
        try:
            return {k: float(v) for k, v in json.loads(counts.read_text()).items()}
        except (OSError, ValueError):
            return {}

    return read


def floor_run(  # noqa: PLR0917 - one run's knobs
    bench: Bench, env: dict[str, str], label: str, jobs: int, rate: float, validation: bool
) -> dict[str, Any]:
    """The replay floor: its own process, watching ``bench-<label>``, then ``run``."""
    namespace = f"bench-{label}"
    ensure_namespace(bench, namespace)
    process, counts = replay_process(bench, env, namespace, validation)
    time.sleep(3)  # its watch is up
    try:
        return run(
            bench, label, jobs, rate, ftj_maker(bench, validation), {"replay": process.pid},
            own_requests=replay_requests(counts), suspended=True,
        )  # fmt: skip
    finally:
        bench.stop(process)


def saturation(steps: list[dict[str, Any]], p99_limit: float) -> float:
    """The highest rate asked whose Jobs kept up: made ≥ 95% as fast as asked, p99 create → Job
    under ``p99_limit``."""
    kept = [
        s["rate_asked"]
        for s in steps
        if s["jobs_made_per_second"] >= 0.95 * s["rate_asked"]
        and s["create_to_job_p99_s"] < p99_limit
    ]
    return max(kept, default=steps[0]["rate_asked"])


def main() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=600, help="per run at the half rate")
    parser.add_argument("--steps", default="5,10,20,40,60", help="the floor's step rates")
    parser.add_argument("--step-seconds", type=float, default=20)
    parser.add_argument("--saturation-p99", type=float, default=2.0)
    parser.add_argument("--rate", type=float, help="skip the step test: run at this rate")
    parser.add_argument("--retained", type=int, default=10000)
    parser.add_argument(
        "--retained-rate", type=float, help="create the retained run's jobs at this rate"
    )
    parser.add_argument(
        "--tracemalloc", type=Path,
        help="run the retained run's operator under tracemalloc: its snapshots here",
    )  # fmt: skip
    parser.add_argument("--skip", default="", help="comma-separated runs to leave out")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--profile", type=Path, help="run the operator under cProfile, its profile here"
    )
    parser.add_argument(
        "--py-spy", type=Path,
        help="sample the operator with py-spy during kubetune's runs: its raw stacks here",
    )  # fmt: skip
    parser.add_argument(
        "--operator-env", action="append", default=[], help="KEY=VALUE for the operator too"
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    os.sched_setaffinity(0, {CONTROL_CPU})  # the cluster started below inherits it
    from kubetune.local.cluster_info import ClusterInfo
    from kubetune.local.controlplane import LocalCluster, NodeOptions

    home = Path(tempfile.mkdtemp(prefix="kubetune-side-by-side-"))
    reaper = start_reaper(home)
    cluster = LocalCluster(home)
    summary: dict[str, Any] = {"machine": machine(), "runs": {}}
    bench: Bench | None = None
    try:
        print(f"starting a local cluster in {home}", flush=True)
        cluster.up(NodeOptions(name="bench", gpus=0))
        kubectl = Path(ClusterInfo.load(cluster.layout).bin_dir) / "kubectl"
        bench = Bench(home, cluster.layout.kubeconfig, cluster, kubectl)
        for pid in bench.control_plane.values():
            pin(pid, CONTROL_CPU)
        summary["control_plane"] = sorted(bench.control_plane)
        bench.kubectl_run("apply", "--server-side", "-f", str(CRD))
        bench.kubectl_run("create", "namespace", SYSTEM)
        objects, deployment = chart(bench, helm_binary())
        bench.kubectl_run("apply", "-n", SYSTEM, "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": objects}))  # fmt: skip
        secret = next(o for o in objects if o["kind"] == "Secret")
        env = chart_operator_env(bench, deployment, secret)
        env.update(item.split("=", 1) for item in args.operator_env)
        time.sleep(3)
        runs = summary["runs"]

        def save() -> None:
            args.out.write_text(json.dumps(summary, indent=1) + "\n")

        rate = args.rate
        if rate is None:
            steps = []
            for step in [float(r) for r in args.steps.split(",")]:
                jobs = int(step * args.step_seconds)
                print(f"floor step: {jobs} at {step}/s", flush=True)
                steps.append(floor_run(bench, env, f"floor-step-{int(step)}", jobs, step, True))
                save()
                if steps[-1]["jobs_made_per_second"] < 0.8 * step:
                    break  # well past saturation
            runs["floor-step"] = steps
            summary["floor_saturation_rate"] = saturation(steps, args.saturation_p99)
            rate = summary["floor_saturation_rate"] / 2
        summary["rate"] = rate
        print(f"half the floor's saturation rate: {rate}/s", flush=True)
        if "floor" not in skip:
            runs["floor"] = floor_run(bench, env, "floor", args.jobs, rate, True)
            save()
        operator = start_operator(bench, env, args.profile)
        sampler = py_spy(operator.pid, args.py_spy)
        port = int(env["KUBETUNE_METRICS_PORT"])
        for validation in (True, False):
            label = f"kubetune-validation-{'on' if validation else 'off'}"
            if label in skip:
                continue
            runs[label] = run(
                bench, label, args.jobs, rate, ftj_maker(bench, validation),
                {"operator": operator.pid}, own_requests=operator_requests(port),
                extra=queue_depth(port), suspended=True,
            )  # fmt: skip
            save()
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its stacks when interrupted
            sampler.wait(120)
        bench.stop(operator)
        if "jobset" not in skip:
            cluster.start_jobset()
            jobset = cluster.running()["jobset"]
            assert jobset is not None
            pin(jobset, CONTROLLER_CPU)
            time.sleep(3)
            runs["jobset"] = run(
                bench, "jobset", args.jobs, rate, jobset_maker(bench), {"jobset": jobset}
            )
            save()
            cluster.process("jobset").stop()
        if args.retained and "retained" not in skip:
            operator = start_operator(bench, env, tracemalloc=args.tracemalloc)
            existing = sum(r["jobs"] for k, r in runs.items() if k.startswith("kubetune"))
            more = max(0, args.retained - existing)
            pace = f"at {args.retained_rate}/s" if args.retained_rate else "as fast as they go"
            print(f"retained: {more} more FineTuneJobs, {pace}", flush=True)
            rss_before = round(rss_mb(operator.pid), 1)
            snapshot(operator, args.tracemalloc)
            runs["retained"] = run(
                bench, "retained", more, args.retained_rate, ftj_maker(bench, True),
                {"operator": operator.pid}, own_requests=operator_requests(port),
                extra=queue_depth(port), suspended=True,
            )  # fmt: skip
            runs["retained"]["finetunejobs_retained"] = existing + more
            runs["retained"]["operator_rss_mb_before"] = rss_before
            time.sleep(35)  # a resync of every job, then RSS
            runs["retained"]["operator_rss_mb_after_resync"] = round(rss_mb(operator.pid), 1)
            snapshot(operator, args.tracemalloc)
            save()
            bench.stop(operator)
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        if bench is not None:
            for process in bench.processes:
                bench.stop(process)
        cluster.down()
        assert reaper.stdin is not None
        reaper.stdin.close()
        reaper.wait(60)
        summary["machine"]["load_average_at_end"] = os.getloadavg()
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"logs: {home}")


def helm_binary() -> Path:
    """The helm CLI hack/helm/build.sh builds (once a machine; cached)."""
    built = subprocess.run(
        ["bash", str(REPO / "hack" / "helm" / "build.sh")], capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return Path(built.stdout.strip().splitlines()[-1])


#: The namespaces the operator watches: its own runs' (the floor's FineTuneJobs, whose children
#: carry kubetune's labels and owners, are not its to reconcile).
OPERATOR_NAMESPACES = ("bench-kubetune-validation-on", "bench-kubetune-validation-off",
                       "bench-retained")  # fmt: skip


def start_operator(
    bench: Bench,
    env: dict[str, str],
    profile: Path | None = None,
    tracemalloc: Path | None = None,
) -> subprocess.Popen[bytes]:
    """The operator, watching ``OPERATOR_NAMESPACES`` (made first, as a cluster has its
    namespaces before an operator that watches them starts); with ``profile``, under
    bench/profile_operator.py, which writes its profile there when stopped; with
    ``tracemalloc``, under bench/tracemalloc_operator.py (``snapshot``)."""
    for namespace in OPERATOR_NAMESPACES:
        ensure_namespace(bench, namespace)
    argv = [str(Path(sys.executable).with_name("kubetune-operator"))]
    extra = {"KUBETUNE_NAMESPACES": ",".join(OPERATOR_NAMESPACES)}
    if profile is not None:
        argv = [sys.executable, str(Path(__file__).with_name("profile_operator.py"))]
        extra["KUBETUNE_PROFILE_OUT"] = str(profile)
    elif tracemalloc is not None:
        argv = [sys.executable, str(Path(__file__).with_name("tracemalloc_operator.py"))]
        extra["KUBETUNE_TRACEMALLOC_DIR"] = str(tracemalloc)
    operator = bench.start(argv, {**env, **extra}, "operator.log")
    wait_leader(int(env["KUBETUNE_METRICS_PORT"]))
    return operator


def py_spy(pid: int, out: Path | None) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the operator (``pid``) 50 times a second without pausing it, only the
    thread holding the GIL (what runs Python: a thread waiting on a socket, a lock or the
    selector is not sampled), its stacks in py-spy's raw (collapsed) format to ``out`` when
    interrupted; for finding where the CPU goes (bench/profile_summary.py), not for timings:
    it takes CPU of its own."""
    if out is None:
        return None
    beside = Path(sys.executable).with_name("py-spy")
    spy = beside if beside.exists() else Path(shutil.which("py-spy") or beside)
    argv = [str(spy), "record", "--nonblocking", "--gil", "--rate", "50", "--format", "raw",
            "--output", str(out), "--pid", str(pid)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def snapshot(operator: subprocess.Popen[bytes], out: Path | None) -> None:
    """A tracemalloc snapshot of an operator run under bench/tracemalloc_operator.py (SIGUSR1),
    waited for (its stats file is written last)."""
    if out is None:
        return
    before = len(list(out.glob("stats-*.txt"))) if out.exists() else 0
    operator.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(list(out.glob("stats-*.txt"))) <= before:
        time.sleep(1)
    print(f"tracemalloc snapshot {before + 1} in {out}", flush=True)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


_REAPER = """
import os, signal, sys
from pathlib import Path
home = Path(sys.argv[1])
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.stdin.buffer.read()
for pid_file in home.glob("*.pid"):
    try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError, PermissionError):
        pass
from kubetune.local.controlplane import LocalCluster
LocalCluster(home).down()
"""


def start_reaper(home: Path) -> subprocess.Popen[bytes]:
    """Stops the controllers and the cluster when this process ends, even by SIGKILL."""
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(home)], stdin=subprocess.PIPE, start_new_session=True
    )


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "uptime_at_start": subprocess.run(
            ["uptime"], check=False, capture_output=True, text=True
        ).stdout.strip(),
        "python": sys.version.split()[0],
    }


def replay_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--validation", choices=("on", "off"), default="on")
    parser.add_argument("--counts", type=Path, required=True)
    args = parser.parse_args(argv)
    replay(args.kubeconfig, args.namespace, args.validation == "on", args.counts)


if __name__ == "__main__":
    if sys.argv[1:2] == ["replay"]:
        replay_main(sys.argv[2:])
    else:
        main()
