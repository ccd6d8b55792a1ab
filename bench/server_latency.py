"""Latency benchmark of kubetune-server on the local cluster (not a test: it prints figures).

``--jobs`` suspended FineTuneJobs in one namespace (nothing trains), one ``kubetune-server``
process, a tenant ServiceAccount's token, and ``--clients`` concurrent openai SDK clients, each
making ``--requests`` calls alternating between ``fine_tuning.jobs.retrieve`` (a random job) and
``fine_tuning.jobs.list`` (a page of 20 after a random job), then each alone (``--mix``). Prints
p50/p99/max of each, from the client's side, and the throughput.

    .venv/bin/python bench/server_latency.py --jobs 500 --clients 50 --requests 40

Starts its own local cluster in a temporary home (``--kubeconfig`` reuses one, which must have
the CRD) and stops it at the end. Figures and the machine they came from: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def start_server(kubeconfig: Path, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "KUBETUNE_SERVER_HOST": "127.0.0.1", "KUBETUNE_SERVER_PORT": str(port),
        "KUBETUNE_SERVER_KUBECONFIG": str(kubeconfig),
        "KUBETUNE_SERVER_FILES_DIR": str(home / "files"),
        "KUBETUNE_SERVER_RATE_LIMIT_PER_SECOND": "0",
    }  # fmt: skip
    with (home / "server.log").open("ab") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("kubetune-server"))], env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):  # noqa: S310 -- loopback
                return process, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("kubetune-server did not start")


def measure(
    url: str, token: str, jobs: int, clients: int, requests: int, *, mix: str = "both"
) -> dict[str, Any]:
    names = [f"bench-{i:05d}" for i in range(jobs)]
    timings: dict[str, list[float]] = {"retrieve": [], "list": []}
    lock = threading.Lock()

    def one_client(seed: int) -> None:
        client = OpenAI(api_key=token, base_url=f"{url}/v1", project=NAMESPACE, max_retries=0)
        rng = random.Random(seed)  # noqa: S311 -- which job to ask for, not a secret
        for i in range(requests):
            kind = mix if mix != "both" else ("retrieve" if i % 2 == 0 else "list")
            started = time.perf_counter()
            if kind == "retrieve":
                client.fine_tuning.jobs.retrieve(rng.choice(names))
            else:
                client.fine_tuning.jobs.list(after=rng.choice(names), limit=20)
            elapsed = time.perf_counter() - started
            with lock:
                timings[kind].append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - started
    summary: dict[str, Any] = {"requests_per_second": round(clients * requests / wall, 1)}
    for kind, values in timings.items():
        if not values:
            continue
        summary[kind] = {
            "count": len(values),
            "p50_ms": round(1000 * percentile(values, 50), 1),
            "p99_ms": round(1000 * percentile(values, 99), 1),
            "max_ms": round(1000 * max(values), 1),
        }
    return summary


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
        "--mix", nargs="+", default=["both", "retrieve", "list"],
        help="runs, one after the other: retrieve and list alternating (both), or one alone",
    )  # fmt: skip
    parser.add_argument("--kubeconfig", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kubetune-bench-api-"))
    cluster: LocalCluster | None = None
    server: subprocess.Popen[bytes] | None = None
    try:
        kubeconfig = args.kubeconfig
        if kubeconfig is None:
            cluster = LocalCluster(home)
            print(f"starting a local cluster in {home}", flush=True)
            info = cluster.up(NodeOptions(name="bench", gpus=0, host_images=("*",)))
            kubeconfig, binary = cluster.layout.kubeconfig, Path(info.bin_dir) / "kubectl"
        else:
            binary = Path(ClusterInfo.load(LocalCluster(kubeconfig.parent).layout).bin_dir)
            binary = binary / "kubectl"
        print(f"{args.jobs} suspended FineTuneJobs in {NAMESPACE}", flush=True)
        token = setup(binary, kubeconfig, args.jobs)
        server, url = start_server(kubeconfig, home)
        measure(url, token, args.jobs, 5, 4)  # warm the connection pools
        summary: dict[str, Any] = {
            "jobs": args.jobs, "clients": args.clients, "requests_per_client": args.requests,
            "cpus": os.cpu_count(),
        }  # fmt: skip
        for mix in args.mix:
            summary[mix] = {
                "load_average_at_start": os.getloadavg(),
                **measure(url, token, args.jobs, args.clients, args.requests, mix=mix),
            }
            print(json.dumps({mix: summary[mix]}), flush=True)
        print(json.dumps(summary, indent=2), flush=True)
        if args.out:
            args.out.write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if server is not None:
            server.terminate()
            server.wait(15)
        if cluster is not None:
            cluster.down()


if __name__ == "__main__":
    main()
