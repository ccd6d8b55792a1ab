"""Scale benchmark of the operator on the local cluster (not a test: it prints figures).

Two runs against one ``kubetune-operator`` process (leader election on, as in the chart):

* **burst**: ``--jobs`` FineTuneJobs created at ``--rate`` per second, suspended (nothing runs).
  Measures create → Job created (p50/p99, from the client's create to the Job's ADDED event on a
  watch), create → status Suspended, API requests per job (the operator's own, from its
  /metrics, Lease renewals excluded), the operator's RSS and CPU, and that every FineTuneJob has
  exactly one Job (none lost, none doubled).
* **progress**: ``--progress-jobs`` jobs whose stand-in trainers run ``--progress-seconds``, while
  this script patches each running job's ``status.progress`` every second, as the trainer would.
  Measures the lag from a Job's Complete to the FineTuneJob's Succeeded, and API requests per job
  from creation to Succeeded (progress writes are the trainer's, not counted).

    .venv/bin/python bench/operator_scale.py --jobs 5000 --rate 50 --progress-jobs 100

Starts its own local cluster in a temporary home (``--kubeconfig`` reuses one) and writes a JSON
summary with ``--out``. However it ends (exit, Ctrl-C, SIGTERM, SIGHUP or SIGKILL), its operator
and cluster are stopped: a reaper process does it when this one's pipe to it closes.
Figures and the machine they came from: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from kubetune.api.timestamps import parse_rfc3339
from kubetune.local.controlplane import LocalCluster, NodeOptions
from kubetune.local.ports import free_port
from kubetune_devtools.installs import scrape_metrics

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"


def delays(later: dict[str, float], earlier: dict[str, float], names: list[str]) -> list[float]:
    """For each name seen at both moments, the seconds from ``earlier`` to ``later``."""
    return [later[n] - earlier[n] for n in names if n in later and n in earlier]


def reached(observer: Any, phase: str) -> dict[str, float]:
    """When each FineTuneJob the observer saw was first seen in ``phase``."""
    return {n: seen[phase] for n, seen in observer.phases.items() if phase in seen}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def spec(suspend: bool, seconds: int) -> dict[str, Any]:
    return {
        "model": {"uri": "org/model"},
        "dataset": {"uri": "https://datasets.invalid/train.jsonl"},
        "output": {"uri": "s3://bucket/adapter"},
        "resources": {"gpus": 0, "shmSize": "16Mi"},
        "runPolicy": {"suspend": suspend, "backoffLimit": 0},
        "podTemplate": {
            "spec": {
                "containers": [
                    {
                        "name": "trainer",
                        "env": [{"name": "KUBETUNE_STAND_IN", "value": f"sleep:{seconds}"}],
                    }
                ]
            }
        },
    }


class Operator:
    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.metrics_port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "KUBETUNE_RUN_AS_NON_ROOT": "false",
            "KUBETUNE_RUN_AS_USER": "",
            "KUBETUNE_FS_GROUP": "",
            "KUBETUNE_LIVENESS_ENDPOINT": f"http://127.0.0.1:{free_port()}/healthz",
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_METRICS_AUTH": "false",  # read without a token
            "KUBETUNE_TRAINER_COMMAND": "kubetune-stand-in-trainer",
            "KUBETUNE_ALLOWED_POD_TEMPLATE_FIELDS": "containers.env",
            "KUBETUNE_ALLOWED_POD_TEMPLATE_ENV": "KUBETUNE_STAND_IN",
            "KUBETUNE_TRAINER_IMAGE": "kubetune/trainer:bench",
        }
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).with_name("kubetune-operator"))],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (log.parent / "operator.pid").write_text(f"{self.process.pid}\n")
        self.peak_rss = 0
        self._sampling = True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while self._sampling:
            self.peak_rss = max(self.peak_rss, self.rss())
            time.sleep(0.5)

    def rss(self) -> int:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def requests_by_kind(self) -> dict[str, float]:
        """The operator's API requests so far by method and resource, Lease renewals aside."""
        counts: dict[str, float] = {}
        for series, value in self.metrics().items():
            if not series.startswith("kubetune_api_requests_total{"):
                continue
            labels = dict(
                part.split("=", 1) for part in series[series.index("{") + 1 : -1].split(",")
            )
            resource = labels.get("resource", "").strip('"')
            if resource == "leases":
                continue
            kind = f"{labels.get('verb', '').strip(chr(34))} {resource}"
            counts[kind] = counts.get(kind, 0.0) + value
        return counts

    def requests(self) -> float:
        """The operator's API requests so far, Lease renewals aside."""
        return sum(self.requests_by_kind().values())

    def wait_leader(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.metrics().get("kubetune_leader") == 1.0:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit("the operator never took its Lease")

    def stop(self) -> None:
        self._sampling = False
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Observer:
    """Watches Jobs and FineTuneJobs of one namespace; records when each is first seen.

    Plain dicts (no typed models: decoding thousands of V1Jobs would make this process, not the
    operator, the bottleneck), and a dropped watch resumes from its last resourceVersion instead
    of listing everything again.
    """

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.jobs_seen: dict[str, float] = {}
        self.jobs_complete: dict[str, float] = {}
        self.phases: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self.custom = client.CustomObjectsApi(api)
        for target in (
            lambda: self._watch("batch", "v1", "jobs", self._on_job),
            lambda: self._watch(GROUP, VERSION, PLURAL, self._on_finetunejob),
        ):
            threading.Thread(target=target, daemon=True).start()

    def _watch(self, group: str, version: str, plural: str, handle: Any) -> None:
        version_seen: str | None = None
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.custom.list_namespaced_custom_object, group, version, self.namespace,
                    plural, timeout_seconds=60, resource_version=version_seen,
                    allow_watch_bookmarks=True,
                ):  # fmt: skip
                    body = event["object"]
                    if event["type"] == "ERROR":
                        version_seen = None  # 410 Gone: from a fresh list
                        break
                    version_seen = body["metadata"].get("resourceVersion", version_seen)
                    if event["type"] != "BOOKMARK":
                        handle(body, time.monotonic())
            except Exception:  # a dropped watch is started again
                time.sleep(0.5)

    def _on_job(self, job: dict[str, Any], now: float) -> None:
        name = job["metadata"]["name"]
        self.jobs_seen.setdefault(name, now)
        for c in (job.get("status") or {}).get("conditions") or []:
            if c.get("type") == "Complete" and c.get("status") == "True":
                self.jobs_complete.setdefault(name, now)

    def _on_finetunejob(self, body: dict[str, Any], now: float) -> None:
        phase = (body.get("status") or {}).get("phase")
        if phase:
            self.phases.setdefault(body["metadata"]["name"], {}).setdefault(phase, now)

    def stop(self) -> None:
        self._stop.set()


def per_job_requests(operator: Operator, before: dict[str, float], jobs: int) -> dict[str, Any]:
    """API requests per job since ``before``: in all, and by method and resource."""
    after = operator.requests_by_kind()
    by_kind = {
        kind: round((count - before.get(kind, 0.0)) / jobs, 3)
        for kind, count in sorted(after.items())
        if count > before.get(kind, 0.0)
    }
    return {"api_requests_per_job": sum(by_kind.values()), "api_requests_per_job_by_kind": by_kind}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its reaped children so far (0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of the operator and of each control-plane process over one run: where the
    machine's time went."""

    def __init__(self, operator: Operator, cluster: LocalCluster | None) -> None:
        self.pids = {"kubetune-operator": operator.process.pid}
        if cluster is not None:
            self.pids.update({n: p for n, p in cluster.running().items() if p is not None})
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {
            name: round(cpu_seconds(pid) - self.before[name], 1) for name, pid in self.pids.items()
        }


class LoadSampler:
    """The machine's 1-minute load average, sampled every 5 s while a run lasts."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(5):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict[str, float]:
        self._stop.set()
        samples = self.samples or [os.getloadavg()[0]]
        return {
            "min": min(samples),
            "mean": round(sum(samples) / len(samples), 2),
            "max": max(samples),
        }


def create_namespace(api: client.ApiClient, name: str) -> None:
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})


def create_at_rate(
    api: client.ApiClient, namespace: str, names: list[str], rate: float, body_spec: dict[str, Any]
) -> dict[str, float]:
    """Create one FineTuneJob per name, ``rate`` per second; when each create returned."""
    custom = client.CustomObjectsApi(api)
    created: dict[str, float] = {}
    start = time.monotonic()

    def one(index: int, name: str) -> None:
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": body_spec,
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        created[name] = time.monotonic()

    pool = ThreadPoolExecutor(16)
    try:
        for future in [pool.submit(one, i, n) for i, n in enumerate(names)]:
            future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    achieved = len(names) / (max(created.values()) - start)
    print(f"  created {len(names)} in {max(created.values()) - start:.1f}s ({achieved:.1f}/s)")
    return created


def wait_until(count: Any, target: int, stall: float, what: str) -> None:
    """Wait until ``count()`` reaches ``target``; give up only when it stops growing for ``stall``
    seconds (a loaded machine makes the run longer, not a failure)."""
    started = time.monotonic()
    moved, last, shown = started, count(), started
    while last < target:
        time.sleep(1)
        now, value = time.monotonic(), count()
        if value != last:
            moved, last = now, value
        if now - moved > stall:
            print(f"  ! {what}: stuck at {last}/{target} for {stall:.0f}s, giving up", flush=True)
            return
        if now - shown > 15:
            print(f"  ... {now - started:.0f}s: {last}/{target} {what}", flush=True)
            shown = now


def census(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    """FineTuneJobs without a Job (lost) or with more than one (doubled), and create → Job by
    the apiserver's own creationTimestamps (whole seconds: each side is truncated, so a delay
    reads up to 1 s off), which no client-side lag can inflate."""
    custom = client.CustomObjectsApi(api)
    created = {
        f["metadata"]["uid"]: parse_rfc3339(f["metadata"]["creationTimestamp"])
        for f in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    }
    counts = dict.fromkeys(created, 0)
    delays: list[float] = []
    for job in custom.list_namespaced_custom_object("batch", "v1", namespace, "jobs")["items"]:
        for ref in job["metadata"].get("ownerReferences") or []:
            if ref.get("controller") and ref["uid"] in counts:
                counts[ref["uid"]] += 1
                made = parse_rfc3339(job["metadata"]["creationTimestamp"])
                delays.append((made - created[ref["uid"]]).total_seconds())
    return {
        "lost": sum(1 for c in counts.values() if c == 0),
        "doubled": sum(1 for c in counts.values() if c > 1),
        "create_to_job_by_server_timestamps_p50_s": percentile(delays, 50),
        "create_to_job_by_server_timestamps_p99_s": percentile(delays, 99),
        "create_to_job_by_server_timestamps_max_s": max(delays, default=float("nan")),
    }


def burst(
    api: client.ApiClient,
    operator: Operator,
    cluster: LocalCluster | None,
    jobs: int,
    rate: float,
) -> dict[str, Any]:
    namespace = "bench-burst"
    create_namespace(api, namespace)
    observer = Observer(api, namespace)
    time.sleep(2)
    names = [f"burst-{i:05d}" for i in range(jobs)]
    requests_before, cpu_before = operator.requests_by_kind(), operator.cpu_seconds()
    load, meter = LoadSampler(), CpuMeter(operator, cluster)
    started = time.monotonic()
    created = create_at_rate(api, namespace, names, rate, spec(suspend=True, seconds=1))
    wait_until(lambda: len(observer.jobs_seen), jobs, 180, "Jobs")
    wait_until(
        lambda: sum(1 for p in observer.phases.values() if "Suspended" in p),
        jobs,
        180,
        "FineTuneJobs Suspended",
    )
    elapsed = time.monotonic() - started
    time.sleep(3)  # let the last status writes land in the count
    to_job = delays(observer.jobs_seen, created, names)
    to_status = delays(reached(observer, "Suspended"), created, names)
    counted = census(api, namespace)
    observer.stop()
    return {
        "jobs": jobs,
        "rate_per_second": rate,
        "achieved_rate_per_second": len(names) / (max(created.values()) - started),
        "create_to_job_p50_s": percentile(to_job, 50),
        "create_to_job_p99_s": percentile(to_job, 99),
        "create_to_job_max_s": max(to_job, default=float("nan")),
        "create_to_suspended_p50_s": percentile(to_status, 50),
        "create_to_suspended_p99_s": percentile(to_status, 99),
        **per_job_requests(operator, requests_before, jobs),
        "operator_cpu_seconds": operator.cpu_seconds() - cpu_before,
        "wall_seconds": elapsed,
        "cpu_seconds_by_process": meter.stop(),
        "load_average": load.stop(),
        "operator_rss_mb_after": operator.rss() / 2**20,
        "operator_rss_mb_peak": operator.peak_rss / 2**20,
        "jobs_seen": len(to_job),
        **counted,
    }


def with_progress(
    api: client.ApiClient,
    operator: Operator,
    cluster: LocalCluster | None,
    jobs: int,
    seconds: int,
) -> dict[str, Any]:
    namespace = "bench-progress"
    create_namespace(api, namespace)
    observer = Observer(api, namespace)
    custom = client.CustomObjectsApi(api)
    time.sleep(2)
    names = [f"progress-{i:03d}" for i in range(jobs)]
    requests_before, cpu_before = operator.requests_by_kind(), operator.cpu_seconds()
    load, meter = LoadSampler(), CpuMeter(operator, cluster)
    stop = threading.Event()
    writes = [0]

    def report() -> None:
        step = 0
        while not stop.is_set():
            tick = time.monotonic()
            step += 1
            for name in names:
                phases = observer.phases.get(name, {})
                if "Running" in phases and "Succeeded" not in phases:
                    patch = {"status": {"progress": {"step": step, "loss": 2.0 / step,
                                                     "tokensPerSecond": 1000.0}}}  # fmt: skip
                    try:
                        custom.patch_namespaced_custom_object_status(
                            GROUP, VERSION, namespace, PLURAL, name, patch
                        )
                        writes[0] += 1
                    except Exception:  # noqa: S112 - a job that finished meanwhile
                        continue
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    created = create_at_rate(api, namespace, names, 20, spec(suspend=False, seconds=seconds))
    wait_until(
        lambda: sum(1 for p in observer.phases.values() if "Succeeded" in p),
        jobs,
        seconds + 180,
        "FineTuneJobs Succeeded",
    )
    stop.set()
    time.sleep(3)
    lag = delays(reached(observer, "Succeeded"), observer.jobs_complete, names)
    to_running = delays(reached(observer, "Running"), created, names)
    counted = census(api, namespace)
    observer.stop()
    return {
        "jobs": jobs,
        "trainer_seconds": seconds,
        "progress_writes": writes[0],
        "succeeded": sum(1 for p in observer.phases.values() if "Succeeded" in p),
        "job_complete_to_succeeded_p50_s": percentile(lag, 50),
        "job_complete_to_succeeded_p99_s": percentile(lag, 99),
        "create_to_running_p50_s": percentile(to_running, 50),
        "create_to_running_p99_s": percentile(to_running, 99),
        **per_job_requests(operator, requests_before, jobs),
        "operator_cpu_seconds": operator.cpu_seconds() - cpu_before,
        "operator_rss_mb_peak": operator.peak_rss / 2**20,
        "cpu_seconds_by_process": meter.stop(),
        "load_average": load.stop(),
        **counted,
    }


def main() -> None:
    # SIGTERM, SIGHUP (a closed terminal) and SIGINT all unwind through the finally below.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--progress-jobs", type=int, default=100)
    parser.add_argument("--progress-seconds", type=int, default=60)
    parser.add_argument("--kubeconfig", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    cluster = None
    home = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    # What SIGKILL leaves (no finally runs): a reaper that tears everything down once this
    # process's end closes its pipe.
    reaper = start_reaper(home, own_cluster=args.kubeconfig is None)
    operator: Operator | None = None
    summary: dict[str, Any] = {"machine": machine()}
    try:
        kubeconfig = args.kubeconfig
        if kubeconfig is None:
            cluster = LocalCluster(home)
            print(f"starting a local cluster in {home}", flush=True)
            cluster.up(NodeOptions(name="bench", gpus=0))
            kubeconfig = cluster.layout.kubeconfig
        api = config.new_client_from_config(str(kubeconfig))
        subprocess.run(
            [*kubectl(cluster), "--kubeconfig", str(kubeconfig), "apply", "--server-side", "-f",
             str(CRD)],
            check=True,
            capture_output=True,
        )  # fmt: skip
        time.sleep(3)
        operator = Operator(kubeconfig, home / "operator.log")
        operator.wait_leader()
        if args.jobs:
            print(f"burst: {args.jobs} suspended FineTuneJobs at {args.rate}/s", flush=True)
            summary["burst"] = burst(api, operator, cluster, args.jobs, args.rate)
            print(json.dumps(summary["burst"], indent=2), flush=True)
        if args.progress_jobs:
            print(f"progress: {args.progress_jobs} jobs, progress every second", flush=True)
            summary["progress"] = with_progress(
                api, operator, cluster, args.progress_jobs, args.progress_seconds
            )
            print(json.dumps(summary["progress"], indent=2), flush=True)
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the teardown
        if operator is not None:
            operator.stop()
        if cluster is not None:
            cluster.down()
        reaper.stdin.close()  # type: ignore[union-attr]  # nothing left: the reaper just exits
        reaper.wait(60)
    print(f"operator log: {home / 'operator.log'}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


_REAPER = """
import os, signal, sys
from pathlib import Path
home, own_cluster = Path(sys.argv[1]), sys.argv[2] == "1"
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the group is the bench's to handle
sys.stdin.buffer.read()  # returns when the bench's end of the pipe closes, however it ended
pid_file = home / "operator.pid"
if pid_file.exists():
    try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
        pass
if own_cluster:
    from kubetune.local.controlplane import LocalCluster
    stopped = LocalCluster(home).down()
    if stopped:
        print("bench reaper: stopped " + ", ".join(stopped), file=sys.stderr)
"""


def start_reaper(home: Path, own_cluster: bool) -> subprocess.Popen[bytes]:
    """A process that stops the operator and the cluster when this one ends, even by SIGKILL
    (its stdin is a pipe only this process writes to: the kernel closes it at exit)."""
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(home), "1" if own_cluster else "0"],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )


def kubectl(cluster: LocalCluster | None) -> list[str]:
    if cluster is not None:
        from kubetune.local.cluster_info import ClusterInfo

        return [str(Path(ClusterInfo.load(cluster.layout).bin_dir) / "kubectl")]
    return ["kubectl"]


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    main()
