"""The operator's watch caches (operator/informer.py) against the real kube-apiserver: the first
list in pages into the index, each change after it told with its owner's key (a deletion too),
the index put right by a list after a watch's resourceVersion is gone (410), a forbidden watch
said with its kind and tried again until it is allowed, and a watch gone silent (through a
proxy, stallproxy.py) started again. ConfigMaps stand in for the children: the informer takes
any kind, filed by the ``kubetune.io/finetunejob`` annotation as a Job or a Pod is."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from kubernetes import client, config
from stallproxy import StallingProxy

from kubetune.operator.caches import owner_key
from kubetune.operator.controller import slim
from kubetune.operator.informer import Gone, Index, Informer, watched_paths
from kubetune.operator.kube import Kube, collection_path
from kubetune.operator.objects import Key
from kubetune_devtools.pytest_plugin import Kubectl, wait_for

pytestmark = pytest.mark.integration

SELECTOR = "app.kubernetes.io/managed-by=kubetune-operator"
T = TypeVar("T")


def kube_for(kubeconfig: Path) -> Kube:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return Kube(client.ApiClient(configuration), 10.0)


def config_map(namespace: str, name: str, owner: str | None, value: str = "1") -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/managed-by": "kubetune-operator"},
    }
    if owner is not None:
        metadata["annotations"] = {"kubetune.io/finetunejob": owner}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"v": value}}


class Running:
    """An informer of one namespace's ConfigMaps on an event loop of its own thread; what it
    told, in order: (type, key, name)."""

    def __init__(self, kube: Kube, namespace: str, **options: Any) -> None:
        self.told: list[tuple[str, Key, str]] = []
        self.index = options.pop("index", None) or Index(
            owner_key, lambda body, _previous: slim(body, ())
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        (path,) = watched_paths("", "v1", "configmaps", [namespace])

        async def start() -> tuple[Informer, asyncio.Task[None]]:
            self.session = aiohttp.ClientSession()
            informer = Informer(
                kube, self.session, path, "ConfigMap", index=self.index, listener=self._told,
                selector=options.pop("selector", SELECTOR),
                chunk_size=options.pop("chunk_size", 2),
                timeout_seconds=options.pop("timeout_seconds", 60),
                inactivity_seconds=options.pop("inactivity_seconds", 60),
            )  # fmt: skip
            return informer, asyncio.create_task(informer.run())

        self.informer, self.task = self.call(start)

    def _told(self, type: str, key: Key, body: dict[str, Any]) -> None:
        self.told.append((type, key, body["metadata"]["name"]))

    def call(self, make: Callable[[], Any]) -> Any:
        """``make()`` run on the loop (awaited when it is a coroutine): the index is the loop's."""

        async def run() -> Any:
            result = make()
            return await result if asyncio.iscoroutine(result) else result

        future: Future[Any] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result(60)

    def view(self) -> dict[Key, list[str]]:
        return self.call(
            lambda: {k: sorted(o["metadata"]["name"] for o in v) for k, v in self.index.items()}
        )

    def listed(self) -> bool:
        return bool(self.call(self.informer.listed.is_set))

    def close(self) -> None:
        async def stop() -> None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            await self.session.close()

        self.call(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def running(kubeconfig_path: Path, namespace: str) -> Iterator[Callable[..., Running]]:
    made: list[Running] = []

    def start(kube: Kube | None = None, **options: Any) -> Running:
        watched = options.pop("namespace", namespace)
        made.append(Running(kube or kube_for(kubeconfig_path), watched, **options))
        return made[-1]

    yield start
    for one in made:
        one.close()


def test_the_first_list_in_pages_fills_the_index_and_every_change_after_is_told_by_owner(
    kubeconfig_path: Path, namespace: str, running: Callable[..., Running]
) -> None:
    kube = kube_for(kubeconfig_path)
    for name, owner in (("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b"), ("b3", "b")):
        kube.create(config_map(namespace, name, owner))
    kube.create(config_map(namespace, "nobodys", None))  # a child of no job: not indexed
    unlabelled = config_map(namespace, "other", "a")
    del unlabelled["metadata"]["labels"]
    kube.create(unlabelled)  # not kubetune's: the label selector keeps it out

    informer = running(chunk_size=2)
    wait_for(informer.listed, 60, "the first list")
    assert informer.view() == {(namespace, "a"): ["a1", "a2"], (namespace, "b"): ["b1", "b2", "b3"]}
    assert sorted(informer.told) == sorted(
        [("ADDED", (namespace, o), n) for n, o in
         (("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b"), ("b3", "b"))]
    )  # fmt: skip

    informer.told.clear()
    path = collection_path("v1", "ConfigMap", namespace)
    kube.create(config_map(namespace, "a3", "a"))
    kube.merge_patch(f"{path}/b1", {"data": {"v": "2"}})
    kube.delete(f"{path}/b2")
    kube.merge_patch(f"{path}/b3", {"metadata": {"annotations": {"kubetune.io/finetunejob": "c"}}})
    wait_for(lambda: len(informer.told) >= 5, 60, "the four changes told")
    assert informer.told == [
        ("ADDED", (namespace, "a"), "a3"),
        ("MODIFIED", (namespace, "b"), "b1"),
        ("DELETED", (namespace, "b"), "b2"),
        ("MODIFIED", (namespace, "c"), "b3"),  # moved to another owner: both told
        ("DELETED", (namespace, "b"), "b3"),
    ]
    assert informer.view() == {
        (namespace, "a"): ["a1", "a2", "a3"],
        (namespace, "b"): ["b1"],
        (namespace, "c"): ["b3"],
    }
    assert informer.call(lambda: informer.index[(namespace, "b")])  # a kopf.Index's answer
    (b1,) = informer.call(lambda: list(informer.index[(namespace, "b")]))
    assert b1["metadata"]["name"] == "b1" and "data" not in b1  # slimmed


def test_a_watch_whose_resource_version_is_gone_lists_again_and_tells_what_changed_meanwhile(
    kubeconfig_path: Path, namespace: str, running: Callable[..., Running]
) -> None:
    """The apiserver ends a watch whose resourceVersion it no longer keeps with an ERROR event of
    code 410: the informer lists again (it could not be made to here: the local apiserver
    answers a watch from an old resourceVersion with its whole state, which the index takes as
    any event), and the list tells what changed since the index last saw it."""
    kube = kube_for(kubeconfig_path)
    path = collection_path("v1", "ConfigMap", namespace)
    for name in ("kept", "changed", "deleted"):
        kube.create(config_map(namespace, name, "a"))
    informer = running()
    wait_for(informer.listed, 60, "the first list")

    async def stop_watching() -> None:
        informer.task.cancel()
        await asyncio.gather(informer.task, return_exceptions=True)

    informer.call(stop_watching)
    kube.merge_patch(f"{path}/changed", {"data": {"v": "2"}})
    kube.delete(f"{path}/deleted")
    kube.create(config_map(namespace, "new", "a"))
    informer.told.clear()
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
    with pytest.raises(Gone):
        informer.informer._event(gone)
    informer.call(informer.informer._list)  # what run() does after Gone
    assert sorted(informer.told) == [
        ("ADDED", (namespace, "a"), "new"),
        ("DELETED", (namespace, "a"), "deleted"),
        ("MODIFIED", (namespace, "a"), "changed"),
    ]
    assert informer.view() == {(namespace, "a"): ["changed", "kept", "new"]}


def test_a_forbidden_watch_is_said_with_its_kind_and_tried_again_until_it_is_allowed(
    kubeconfig_path: Path,
    namespace: str,
    running: Callable[..., Running],
    kubectl: Kubectl,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kubectl("create", "serviceaccount", "reader", "-n", namespace)
    token = kubectl("create", "token", "reader", "-n", namespace).stdout.strip()
    source = yaml.safe_load(kubeconfig_path.read_text())
    cluster = source["clusters"][0]["cluster"]
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "reader",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "reader", "user": {"token": token}}],
        "contexts": [{"name": "reader", "context": {"cluster": "c", "user": "reader"}}],
    }))  # fmt: skip
    kube_for(kubeconfig_path).create(config_map(namespace, "x1", "a"))

    caplog.set_level(logging.WARNING, logger="kubetune.operator.informer")
    informer = running(kube_for(tmp_path / "kubeconfig"))
    wait_for(
        lambda: sum("ConfigMap" in r.getMessage() and "403" in r.getMessage()
                    for r in caplog.records) >= 2,
        60,
        "the refusal said twice",
    )  # fmt: skip
    assert not informer.listed()
    kubectl("create", "role", "reader", "--verb=list,watch", "--resource=configmaps",
            "-n", namespace)  # fmt: skip
    kubectl("create", "rolebinding", "reader", "--role=reader",
            f"--serviceaccount={namespace}:reader", "-n", namespace)  # fmt: skip
    wait_for(informer.listed, 90, "the list once allowed")
    assert informer.view() == {(namespace, "a"): ["x1"]}


def test_a_watch_gone_silent_is_started_again_and_brings_what_was_made_meanwhile(
    kubeconfig_path: Path, namespace: str, running: Callable[..., Running], tmp_path: Path
) -> None:
    kube = kube_for(kubeconfig_path)
    source = yaml.safe_load(kubeconfig_path.read_text())
    target = source["clusters"][0]["cluster"]["server"].removeprefix("https://")
    host, _, port = target.rpartition(":")
    with StallingProxy((host, int(port))) as proxy:
        through = kube_for(proxy.kubeconfig(kubeconfig_path, tmp_path / "kubeconfig"))
        informer = running(through, inactivity_seconds=3)
        wait_for(informer.listed, 60, "the first list")
        kube.create(config_map(namespace, "before", "a"))
        wait_for(lambda: informer.told, 60, "the first change told")
        assert proxy.stall() >= 1  # the watch's connection goes silent, never closed
        kube.create(config_map(namespace, "during", "a"))
        wait_for(lambda: len(informer.told) >= 2, 60, "the change made in the silence")
        # The informer hung up on the silent connection itself (the server never closed it).
        wait_for(lambda: proxy.closed_by_client_while_stalled >= 1, 30, "the hang-up")
    assert informer.told == [
        ("ADDED", (namespace, "a"), "before"),
        ("ADDED", (namespace, "a"), "during"),
    ]


def test_one_index_filled_from_two_namespaces_keeps_each_ones_objects_through_the_others_lists(
    kubeconfig_path: Path, namespace: str, running: Callable[..., Running], kubectl: Kubectl
) -> None:
    """Named namespaces are watched one by one into one index per kind: a list of one
    namespace (the first, or one after a 410) puts only that namespace's objects right."""
    other = f"{namespace[:50]}-b"
    kubectl("create", "namespace", other)
    try:
        kube = kube_for(kubeconfig_path)
        kube.create(config_map(namespace, "mine", "a"))
        kube.create(config_map(other, "theirs", "a"))
        first = running()
        wait_for(first.listed, 60, "the first namespace's list")
        second = running(namespace=other, index=first.index)
        wait_for(second.listed, 60, "the second namespace's list")
        assert first.view() == {(namespace, "a"): ["mine"], (other, "a"): ["theirs"]}
        first.call(first.informer._list)  # a list again, as after a 410
        assert first.view() == {(namespace, "a"): ["mine"], (other, "a"): ["theirs"]}
        assert [t for t in first.told + second.told if t[0] == "DELETED"] == []
    finally:
        kubectl("delete", "namespace", other, "--wait=false", check=False)
