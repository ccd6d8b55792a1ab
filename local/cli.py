"""``kubetune local up|down|status|kubeconfig``: the local cluster from the command line."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from kubetune.local.binaries import BinariesError
from kubetune.local.cluster_access import ClusterError
from kubetune.local.cluster_info import ClusterInfo
from kubetune.local.controlplane import DEFAULT_NODE_NAME, LocalCluster, NodeOptions
from kubetune.local.layout import default_home


def _cluster(args: argparse.Namespace) -> LocalCluster:
    return LocalCluster(args.home)


def cmd_up(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    was_running = cluster.ready() if cluster.layout.cluster_file.exists() else False
    started = time.monotonic()
    try:
        info = cluster.up(
            NodeOptions(
                name=args.node_name,
                gpus=args.gpus,
                labels=args.label,
                taints=args.taint,
                images=tuple(args.image),
            ),
            kueue=args.kueue,
            jobset=args.jobset,
            registry=args.registry,
        )
    except (ClusterError, BinariesError) as error:
        print(f"kubetune local up: {error}", file=sys.stderr)
        return 1
    verb = "already running" if was_running else f"started in {time.monotonic() - started:.1f}s"
    kubeconfig = cluster.layout.kubeconfig
    print(f"local cluster {verb}: {info.server} (state in {info.home})")
    if not was_running:
        print(
            "the node is a real kubelet with containerd and runc; images: "
            + (", ".join(args.image) or "none imported")
        )
    if args.kueue:
        print(
            f"Kueue runs beside it ({info.kueue_dir}): Jobs labelled kueue.x-k8s.io/queue-name "
            "wait for their LocalQueue's quota"
        )
    if args.jobset:
        print(
            f"JobSet's controller runs beside it ({info.jobset_dir}): run the operator with "
            "KUBETUNE_GROUP_WORKLOAD=jobset for multi-pod groups as JobSets"
        )
    if args.registry:
        print(
            f"an OCI registry runs beside it at {info.registry_host} (plain http, no login): "
            f"output.uri: oci://{info.registry_host}/<repository>[:<tag>] with "
            "output.registry.plainHttp, where the chart's trainer.allowedRegistries and "
            "trainer.plainHttpRegistries name it"
        )
    print("use it with:")
    print(f"  export KUBECONFIG={kubeconfig}")
    print(f"  export PATH={info.bin_dir}:$PATH   # the matching kubectl")
    print("  kubectl get nodes")
    print(f"admin bearer token (for curl): {cluster.pki.admin_token}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    stopped = cluster.down()
    print("stopped " + ", ".join(stopped) if stopped else "no local cluster was running")
    if args.purge and cluster.layout.home.exists():
        # Only a directory that holds a cluster's state is removed, never an arbitrary path.
        if not cluster.layout.cluster_file.exists():
            print(f"not removing {cluster.layout.home}: it holds no cluster.json", file=sys.stderr)
            return 1
        shutil.rmtree(cluster.layout.home)
        print(f"removed {cluster.layout.home}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    processes = cluster.running()
    for name, pid in processes.items():
        print(f"{name:28} {f'running (pid {pid})' if pid else 'stopped'}")
    if not cluster.layout.cluster_file.exists():
        print(f"no local cluster in {cluster.layout.home}")
        return 1
    info = ClusterInfo.load(cluster.layout)
    ready = cluster.ready()
    print(f"apiserver {info.server}: {'ready' if ready else 'not ready'}")
    print(f"kubeconfig: {cluster.layout.kubeconfig}")
    return 0 if ready else 1


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    print(_cluster(args).layout.kubeconfig)
    return 0


def _add_up_arguments(up: argparse.ArgumentParser) -> None:
    """``kubetune local up``'s options: the first node, and what runs beside the control plane."""
    up.add_argument("--gpus", type=int, default=1, help="nvidia.com/gpu capacity of the node")
    up.add_argument("--node-name", default=DEFAULT_NODE_NAME)
    up.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="node label (repeatable)"
    )
    up.add_argument(
        "--taint",
        action="append",
        default=[],
        metavar="KEY[=VALUE]:EFFECT",
        help="node taint (repeatable)",
    )
    up.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="REFERENCE",
        help="an image of the image store (make images) to import into the node's containerd "
        "(repeatable; kept there between clusters, imported again only when it changed)",
    )
    up.add_argument(
        "--kueue",
        action="store_true",
        help="also run Kueue (built from its Go module) and install its CRDs; on a running "
        "cluster, start it there",
    )
    up.add_argument(
        "--jobset",
        action="store_true",
        help="also run JobSet's controller (built from its Go module) and install its CRD; on a "
        "running cluster, start it there (with --kueue, Kueue admits JobSets too)",
    )
    up.add_argument(
        "--registry",
        action="store_true",
        help="also run an OCI registry on 127.0.0.1 (distribution's, built from its Go module) "
        "for oci:// outputs; on a running cluster, start it there",
    )


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``local`` and its sub-commands to the ``kubetune`` command line."""
    local = subparsers.add_parser(
        "local",
        help="run a local Kubernetes cluster (a real control plane and a real node: kubelet, "
        "containerd, runc; root)",
    )
    local.add_argument(
        "--home",
        type=Path,
        default=None,
        help=f"state directory (default: $KUBETUNE_HOME or {default_home()})",
    )
    commands = local.add_subparsers(dest="local_command", required=True)

    up = commands.add_parser("up", help="start the cluster (reuses a running one)")
    _add_up_arguments(up)
    up.set_defaults(func=cmd_up)
    down = commands.add_parser("down", help="stop the cluster")
    down.add_argument("--purge", action="store_true", help="also delete its state (etcd, volumes)")
    down.set_defaults(func=cmd_down)
    commands.add_parser("status", help="show what runs").set_defaults(func=cmd_status)
    commands.add_parser("kubeconfig", help="print the kubeconfig's path").set_defaults(
        func=cmd_kubeconfig
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
