"""Latency benchmark of kubetune-server on the local cluster (not a test: it prints figures).

``--jobs`` suspended FineTuneJobs in one namespace (nothing trains), a tenant ServiceAccount's
token, the server's own read-only account, and per ``--servers`` mode one ``kubetune-server``
process: ``cache`` (reads from its watch-backed cache) or ``direct`` (each read with the
caller's token), served with uvloop and httptools (``--http fast``) or asyncio's loop and h11
(``standard``). ``--clients`` concurrent clients make ``--requests`` calls each:
``fine_tuning.jobs.retrieve`` (a random job), ``fine_tuning.jobs.list`` (a page of 20 after a
random job) or the two alternating (``--mix``), closed loop; then the alternating mix open loop
at each of ``--rates`` calls/s (latency from when each call was due). The clients are
hack/loadgen (``--loadgen go``: compiled, built once by hack/loadgen/build.sh) or openai SDK
clients in this process's threads (``python``). Each ``--placements`` entry runs it all again:
``unpinned`` (the scheduler places everything) or ``pinned`` (``taskset``: the server on CPU 0,
the clients on CPU 1; the cluster unpinned). Prints, per run, p50/p99/max from the client's side
and the server's own (its access log), the throughput, CPU milliseconds a call of the server,
kube-apiserver, etcd and the clients, and the machine's load.

    .venv/bin/python bench/server_latency.py --jobs 500 --clients 50 --requests 100 \
        --servers cache direct --http fast standard --placements unpinned pinned \
        --rates 100 200 --out FILE

Starts its own local cluster in a temporary home (``--kubeconfig`` reuses one, which must have
the CRD) and stops it at the end. Figures and the machine they came from: docs/performance.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from openai import OpenAI

from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.controlplane import LocalCluster, NodeOptions
from kubetune.local.ports import free_port

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
NAMESPACE = "bench-api"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def kubectl(binary: Path, kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [str(binary), "--kubeconfig", str(kubeconfig), *args],
        input=stdin, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "model": {"uri": "meta-llama/Llama-2-7b-hf"},
            "dataset": {"uri": "pvc://data/train.jsonl"},
            "output": {"uri": f"pvc://adapters/{name}"},
            "runPolicy": {"suspend": True}, "validation": {"enabled": False},
        },
    }  # fmt: skip


def setup(binary: Path, kubeconfig: Path, jobs: int) -> str:
    """The namespace, a tenant's rights and token, and ``jobs`` FineTuneJobs; the token."""
    run = lambda *a, stdin=None: kubectl(binary, kubeconfig, *a, stdin=stdin)  # noqa: E731
    run("apply", "--server-side", "-f", str(CRD))
    run("create", "namespace", NAMESPACE)
    tenant = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bench"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "b"},
         "rules": [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"],
                    "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "b"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "b"},
         "subjects": [{"kind": "ServiceAccount", "name": "bench", "namespace": NAMESPACE}]},
    ]  # fmt: skip
    for start in range(0, jobs, 100):
        batch = [job(f"bench-{i:05d}") for i in range(start, min(jobs, start + 100))]
        run("apply", "-n", NAMESPACE, "-f", "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": batch}))  # fmt: skip
    run("apply", "-n", NAMESPACE, "-f", "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": tenant}))  # fmt: skip
    deadline = time.monotonic() + 60
    while True:  # the token controller makes the ServiceAccount before a token can be had
        try:
            return run("create", "token", "bench", "-n", NAMESPACE, "--duration", "1h").strip()
        except subprocess.CalledProcessError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def server_identity(binary: Path, kubeconfig: Path, home: Path) -> Path:
    """The server's own account as the chart makes it with server.cache.enabled (get/list/watch
    FineTuneJobs cluster-wide), and its token in a file."""
    run = lambda *a, stdin=None: kubectl(binary, kubeconfig, *a, stdin=stdin)  # noqa: E731
    run("create", "namespace", "kubetune-system")
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "kubetune-server", "namespace": "kubetune-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "kubetune-server-read-jobs"},
         "rules": [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "kubetune-server-read-jobs"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "kubetune-server-read-jobs"},
         "subjects": [{"kind": "ServiceAccount", "name": "kubetune-server",
                       "namespace": "kubetune-system"}]},
    ]  # fmt: skip
    run(
        "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    path = home / "server-token"
    for _ in range(60):
        try:
            token = run("create", "token", "kubetune-server", "-n", "kubetune-system",
                        "--duration", "2h")  # fmt: skip
            path.write_text(token.strip())
            return path
        except subprocess.CalledProcessError:
            time.sleep(1)
    raise RuntimeError("no token for the server's account")


SERVER_CPU, CLIENT_CPU = 0, 1  # the pinned placement's split of the first two CPUs


def start_server(
    kubeconfig: Path, home: Path, cache_token: Path | None, *, fast_http: bool, pinned: bool
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    env = {
        **os.environ,
        "KUBETUNE_SERVER_HOST": "127.0.0.1", "KUBETUNE_SERVER_PORT": str(port),
        "KUBETUNE_SERVER_KUBECONFIG": str(kubeconfig),
        "KUBETUNE_SERVER_FILES_DIR": str(home / "files"),
        "KUBETUNE_SERVER_RATE_LIMIT_PER_SECOND": "0",
        "KUBETUNE_SERVER_FAST_HTTP": str(fast_http).lower(),
    }  # fmt: skip
    if cache_token is not None:
        env["KUBETUNE_SERVER_CACHE_TOKEN_FILE"] = str(cache_token)
    log_path = home / f"server-{'cache' if cache_token else 'direct'}.log"
    command = [str(Path(sys.executable).with_name("kubetune-server"))]
    if pinned:  # taskset execs the server: the pid is the server's
        command = ["taskset", "-c", str(SERVER_CPU), *command]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):  # noqa: S310 -- loopback
                return process, url, log_path
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("kubetune-server did not start")


def call(client: OpenAI, kind: str, rng: random.Random, names: list[str]) -> None:
    if kind == "retrieve":
        client.fine_tuning.jobs.retrieve(rng.choice(names))
    else:
        client.fine_tuning.jobs.list(after=rng.choice(names), limit=20)


def measure_go(
    loadgen: Path, url: str, token_file: Path, args: argparse.Namespace, *, clients: int,
    requests: int, mix: str = "both", rate: float = 0.0, pinned: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The same runs as ``measure``, made by hack/loadgen (compiled, in a process of its own)."""
    command = [
        str(loadgen), "-url", url, "-token-file", str(token_file), "-project", NAMESPACE,
        "-jobs", str(args.jobs), "-clients", str(clients), "-requests", str(requests),
        "-mix", mix, "-rate", str(rate),
    ]  # fmt: skip
    if pinned:
        command = ["taskset", "-c", str(CLIENT_CPU), *command]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def measure(
    url: str,
    token: str,
    jobs: int,
    clients: int,
    requests: int,
    *,
    mix: str = "both",
    rate: float = 0.0,
) -> dict[str, Any]:
    """Closed loop (rate 0): each client calls again as soon as answered; latency is call to
    answer. Open loop: call i is due at start + i/rate whatever came before, clients take due
    calls in turn, and latency runs from when the call was due (time spent waiting for a free
    client counts, so an overloaded server can't hide behind slow clients)."""
    names = [f"bench-{i:05d}" for i in range(jobs)]
    timings: dict[str, list[float]] = {"retrieve": [], "list": []}
    lock = threading.Lock()
    total = clients * requests
    counter = iter(range(total))
    # Each client made and connected before the clock starts (an SDK client costs ~10 ms of CPU
    # to make, and its first call a TCP connection): what is timed is calls, not set-up.
    made = [
        OpenAI(api_key=token, base_url=f"{url}/v1", project=NAMESPACE, max_retries=0)
        for _ in range(clients)
    ]
    for client in made:
        client.fine_tuning.jobs.retrieve(names[0])
    ready = threading.Barrier(clients + 1)
    started = 0.0

    def one_client(seed: int) -> None:
        client = made[seed]
        rng = random.Random(seed)  # noqa: S311 -- which job to ask for, not a secret
        ready.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            kind = mix if mix != "both" else ("retrieve" if i % 2 == 0 else "list")
            due = time.perf_counter()
            if rate > 0:
                due = started + i / rate
                time.sleep(max(0.0, due - time.perf_counter()))
            call(client, kind, rng, names)
            elapsed = time.perf_counter() - due
            with lock:
                timings[kind].append(elapsed)

    with ThreadPoolExecutor(clients) as pool:
        running = [pool.submit(one_client, seed) for seed in range(clients)]
        started = time.perf_counter()
        ready.wait()
        for future in running:
            future.result()
    wall = time.perf_counter() - started
    summary: dict[str, Any] = {"seconds": round(wall, 1),
                               "requests_per_second": round(total / wall, 1)}  # fmt: skip
    for kind, values in timings.items():
        if values:
            summary[kind] = summarize(values)
    return summary


def summarize(values: list[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50_ms": round(1000 * percentile(values, 50), 1),
        "p99_ms": round(1000 * percentile(values, 99), 1),
        "max_ms": round(1000 * max(values), 1),
    }


# --- where the time goes: CPU by process, machine load, the server's own view ------------------

ROUTES = {"GET /v1/fine_tuning/jobs/{job_id}": "retrieve", "GET /v1/fine_tuning/jobs": "list"}


def pids_of(home: Path, server: int) -> dict[str, int]:
    """The processes the calls pass through: the server, and the cluster's apiserver and etcd."""
    found = {"server": server}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = Path(argv[0].decode(errors="replace")).name
        if name in {"kube-apiserver", "etcd"} and str(home).encode() in b" ".join(argv):
            found[name] = int(entry.name)
    return found


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for name, pid in pids.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        seconds[name] = (int(fields[11]) + int(fields[12])) / ticks
    # This process's client threads, or the finished loadgen processes (waited children).
    seconds["bench clients"] = sum(
        usage.ru_utime + usage.ru_stime
        for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    return seconds


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every core since boot (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def server_side(log_path: Path, offset: int) -> dict[str, Any]:
    """The server's own time per call (its access log: request in to response out)."""
    times: dict[str, list[float]] = {}
    with log_path.open("rb") as log:
        log.seek(offset)
        for line in log.read().decode(errors="replace").splitlines():
            for route, kind in ROUTES.items():
                if f" {route} 200 " in line:
                    times.setdefault(kind, []).append(float(line.rsplit(" ", 1)[1][:-2]) / 1000)
    return {kind: summarize(values) for kind, values in times.items()}


def measured_run(
    target: Target, args: argparse.Namespace, *, mix: str, rate: float, pids: dict[str, int],
    log_path: Path,
) -> dict[str, Any]:  # fmt: skip
    offset = log_path.stat().st_size
    cpu_before, busy_before = cpu_seconds(pids), machine_busy()
    load_before = os.getloadavg()
    result = target.measure(args, clients=args.clients, requests=args.requests, mix=mix, rate=rate)
    cpu_after, busy_after = cpu_seconds(pids), machine_busy()
    calls = args.clients * args.requests
    busy = (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1])
    return {
        "open_loop_rate": rate or None,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "machine_cpu_busy": round(busy, 3),
        **result,
        "server_side": server_side(log_path, offset),
        "cpu_ms_per_call": {
            name: round(1000 * (cpu_after[name] - cpu_before[name]) / calls, 2)
            for name in cpu_after
        },
    }


class Target:
    """A running server and the clients that call it: hack/loadgen or threads of this process
    (pinned to the clients' CPU while they run, when the placement is pinned)."""

    def __init__(
        self, url: str, token: str, token_file: Path, loadgen: Path | None, pinned: bool
    ) -> None:
        self.url, self.token, self.token_file = url, token, token_file
        self.loadgen, self.pinned = loadgen, pinned

    def measure(
        self, args: argparse.Namespace, *, clients: int, requests: int, mix: str = "both",
        rate: float = 0.0,
    ) -> dict[str, Any]:  # fmt: skip
        if self.loadgen is not None:
            return measure_go(
                self.loadgen, self.url, self.token_file, args, clients=clients,
                requests=requests, mix=mix, rate=rate, pinned=self.pinned,
            )  # fmt: skip
        affinity = os.sched_getaffinity(0)
        if self.pinned:  # threads made from here on inherit it
            os.sched_setaffinity(0, {CLIENT_CPU})
        try:
            return measure(self.url, self.token, args.jobs, clients, requests, mix=mix, rate=rate)
        finally:
            os.sched_setaffinity(0, affinity)


def build_loadgen() -> Path:
    done = subprocess.run(
        ["bash", str(REPO / "hack" / "loadgen" / "build.sh")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(done.stdout.strip().splitlines()[-1])


def versions(loadgen: Path | None) -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in ("uvicorn", "uvloop", "httptools", "fastapi", "starlette", "pydantic", "openai"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    if loadgen is not None:
        go = subprocess.run(
            ["go", "version", str(loadgen)], check=False, capture_output=True, text=True
        )
        found["loadgen"] = go.stdout.strip().rsplit(" ", 1)[-1] or "?"
    return found


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    # SIGTERM and SIGHUP unwind through the finally below (server and cluster stopped), as Ctrl-C.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=40, help="per client")
    parser.add_argument(
        "--mix", nargs="+", default=["retrieve", "list", "both"],
        help="runs, one after the other: retrieve and list alternating (both), or one alone",
    )  # fmt: skip
    parser.add_argument(
        "--servers", nargs="+", default=["cache"], choices=["cache", "direct"],
        help="the server's reads from its watch-backed cache, or each with the caller's token",
    )  # fmt: skip
    parser.add_argument(
        "--http", nargs="+", default=["fast"], choices=["fast", "standard"],
        help="the server's loop and parser: uvloop and httptools, or asyncio's and h11",
    )  # fmt: skip
    parser.add_argument(
        "--loadgen", default="go", choices=["go", "python"],
        help="the clients: hack/loadgen, or openai SDK clients in threads of this process",
    )  # fmt: skip
    parser.add_argument(
        "--placements", nargs="+", default=["unpinned"], choices=["unpinned", "pinned"],
        help=f"pinned: the server on CPU {SERVER_CPU}, the clients on CPU {CLIENT_CPU} (taskset)",
    )  # fmt: skip
    parser.add_argument(
        "--rates", nargs="*", type=float, default=[],
        help="open-loop runs at these total rates (calls/s) after the closed-loop ones",
    )  # fmt: skip
    parser.add_argument("--kubeconfig", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kubetune-bench-api-"))
    cluster: LocalCluster | None = None
    try:
        kubeconfig = args.kubeconfig
        if kubeconfig is None:
            cluster = LocalCluster(home)
            print(f"starting a local cluster in {home}", flush=True)
            info = cluster.up(NodeOptions(name="bench", gpus=0))
            kubeconfig, binary = cluster.layout.kubeconfig, Path(info.bin_dir) / "kubectl"
        else:
            binary = Path(ClusterInfo.load(LocalCluster(kubeconfig.parent).layout).bin_dir)
            binary = binary / "kubectl"
        print(f"{args.jobs} suspended FineTuneJobs in {NAMESPACE}", flush=True)
        token = setup(binary, kubeconfig, args.jobs)
        token_file = home / "tenant-token"
        token_file.write_text(token)
        identity = server_identity(binary, kubeconfig, home)
        loadgen = build_loadgen() if args.loadgen == "go" else None
        uptime = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout
        uptime = uptime.strip()
        summary: dict[str, Any] = {
            "jobs": args.jobs, "clients": args.clients, "requests_per_client": args.requests,
            "cpus": os.cpu_count(), "loadgen": args.loadgen, "uptime_at_start": uptime,
            "versions": versions(loadgen), "runs": [],
        }  # fmt: skip
        for placement in args.placements:
            for mode in args.servers:
                for http in args.http:
                    run_server(
                        mode, http, placement, args, kubeconfig=kubeconfig, home=home,
                        identity=identity, token=token, token_file=token_file, loadgen=loadgen,
                        summary=summary,
                    )  # fmt: skip
        if args.out:
            args.out.write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if cluster is not None:
            cluster.down()


def run_server(
    mode: str, http: str, placement: str, args: argparse.Namespace, *, kubeconfig: Path,
    home: Path, identity: Path, token: str, token_file: Path, loadgen: Path | None,
    summary: dict[str, Any],
) -> None:  # fmt: skip
    """One server process (cache or direct; fast or standard HTTP; pinned or not) through every
    closed-loop mix and open-loop rate."""
    pinned = placement == "pinned"
    server, url, log_path = start_server(
        kubeconfig, home, identity if mode == "cache" else None, fast_http=http == "fast",
        pinned=pinned,
    )  # fmt: skip
    try:
        pids = pids_of(kubeconfig.parent, server.pid)
        target = Target(url, token, token_file, loadgen, pinned)
        target.measure(args, clients=5, requests=4)  # warm the connection pools (and the cache)
        runs = [(mix, 0.0) for mix in args.mix] + [("both", rate) for rate in args.rates]
        for mix, rate in runs:
            measured = measured_run(target, args, mix=mix, rate=rate, pids=pids, log_path=log_path)
            result = {"server": mode, "http": http, "placement": placement, "mix": mix,
                      **measured}  # fmt: skip
            summary["runs"].append(result)
            print(json.dumps(result), flush=True)
    finally:
        server.terminate()
        server.wait(15)


if __name__ == "__main__":
    main()
