"""Dynamic provisioning for the local cluster: a default StorageClass
``standard`` whose claims get a PersistentVolume backed by a directory under
the state dir. It plays the part of an external provisioner; the real
persistentvolume-binder controller in kube-controller-manager does the binding.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kubetune.local.layout import Layout, default_home
from kubetune.local.rest import JSON, ApiError, Rest, path_for

log = logging.getLogger("kubetune.local.provisioner")

PROVISIONER = "kubetune.io/local"
STORAGE_CLASS = "standard"
STORAGE_GROUP = "storage.k8s.io/v1"
# Set on a claim by the persistentvolume-binder controller: which provisioner should act.
PROVISIONER_ANNOTATIONS = (
    "volume.kubernetes.io/storage-provisioner",
    "volume.beta.kubernetes.io/storage-provisioner",
)


class Provisioner:
    def __init__(self, home: Path) -> None:
        self.layout = Layout(home)
        self.rest = Rest.for_home(home)

    def ensure_storage_class(self) -> None:
        storage_class = {
            "apiVersion": STORAGE_GROUP,
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }
        try:
            self.rest.post(path_for(None, "storageclasses", group=STORAGE_GROUP), storage_class)
        except ApiError as error:
            if error.status != 409:
                raise

    def _ours(self, claim: JSON) -> bool:
        annotations = claim["metadata"].get("annotations") or {}
        return any(annotations.get(a) == PROVISIONER for a in PROVISIONER_ANNOTATIONS)

    def provision(self, claim: JSON) -> None:
        """Create a PV pre-bound to ``claim``; the binder controller completes the binding."""
        meta = claim["metadata"]
        if (
            claim["spec"].get("volumeName")
            or not self._ours(claim)
            or meta.get("deletionTimestamp")
        ):
            return
        name = f"pvc-{meta['uid']}"
        directory = self.layout.volumes / f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o777)  # any pod user may write, as with a fresh filesystem
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": name,
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
            },
            "spec": {
                "capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]},
                "accessModes": claim["spec"].get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": claim["spec"].get("storageClassName") or STORAGE_CLASS,
                "volumeMode": claim["spec"].get("volumeMode", "Filesystem"),
                "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        try:
            self.rest.post("/api/v1/persistentvolumes", volume)
            log.info(
                "provisioned %s for %s/%s at %s", name, meta["namespace"], meta["name"], directory
            )
        except ApiError as error:
            if error.status != 409:
                raise

    def reclaim(self, volume: JSON) -> None:
        """Delete a released volume of ours, and its directory (reclaim policy Delete)."""
        annotations = volume["metadata"].get("annotations") or {}
        spec = volume["spec"]
        if (
            annotations.get("pv.kubernetes.io/provisioned-by") != PROVISIONER
            or volume.get("status", {}).get("phase") != "Released"
            or spec.get("persistentVolumeReclaimPolicy") != "Delete"
        ):
            return
        path = Path(spec["hostPath"]["path"])
        if path.resolve().is_relative_to(self.layout.volumes.resolve()):
            shutil.rmtree(path, ignore_errors=True)
        try:
            self.rest.delete(path_for(None, "persistentvolumes", volume["metadata"]["name"]))
        except ApiError as error:
            if error.status != 404:
                raise

    def _loop(self, resource: str, handle: Callable[[JSON], None]) -> None:
        path = f"/api/v1/{resource}"
        while True:
            try:
                listing = self.rest.get(path)
                for item in listing["items"]:
                    handle(item)
                for event in self.rest.watch(path, listing["metadata"]["resourceVersion"]):
                    if event["type"] in ("ADDED", "MODIFIED"):
                        handle(event["object"])
                    elif event["type"] == "ERROR":
                        break
            except Exception as error:
                log.warning("%s watch: %s; listing again", resource, error)
                time.sleep(1)

    def run(self) -> None:
        self.ensure_storage_class()
        threading.Thread(
            target=self._loop, args=("persistentvolumes", self.reclaim), daemon=True
        ).start()
        self._loop("persistentvolumeclaims", self.provision)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.local.provisioner")
    parser.add_argument("--home", type=Path, default=default_home())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Provisioner(args.home.resolve()).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
