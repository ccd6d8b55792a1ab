"""The real node's configuration as pure functions: addresses that avoid what the host and the
cluster's other nodes use, and a pause image archive that is the same for the same binary."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import tarfile
from pathlib import Path

import pytest

from kubetune.local.real_node_config import (
    LINK_NETWORK,
    PAUSE_IMAGE,
    POD_NETWORKS,
    cni_conflist,
    link_addresses,
    node_id,
    pod_network,
)

pytestmark = pytest.mark.unit


def test_two_clusters_or_two_nodes_get_different_ids() -> None:
    ids = {
        node_id(Path("/a"), "node"),
        node_id(Path("/b"), "node"),
        node_id(Path("/a"), "other"),
    }
    assert len(ids) == 3
    assert all(len(i) == 10 for i in ids)


def test_the_host_link_avoids_the_hosts_routes() -> None:
    ident = node_id(Path("/a"), "node")
    first = link_addresses(ident, set())
    again = link_addresses(ident, {first})
    assert first.prefixlen == again.prefixlen == 30
    assert first.subnet_of(LINK_NETWORK) and again.subnet_of(LINK_NETWORK)
    assert not again.overlaps(first)


def test_no_link_is_left_when_the_host_routes_the_whole_range() -> None:
    with pytest.raises(RuntimeError, match="no free /30"):
        link_addresses("0000000000", {ipaddress.IPv4Network("10.0.0.0/8")})


def test_each_real_node_of_a_cluster_gets_its_own_pod_range() -> None:
    ident = node_id(Path("/a"), "node")
    first = pod_network(ident, set())
    second = pod_network(ident, {first})
    assert first != second
    assert first.prefixlen == second.prefixlen == 24
    assert first.subnet_of(POD_NETWORKS) and second.subnet_of(POD_NETWORKS)
    gateway = cni_conflist(second)["plugins"][0]["ipam"]["ranges"][0][0]["gateway"]
    assert gateway == str(second.network_address + 1)


def test_the_pause_image_archive_is_an_oci_layout_named_for_the_sandbox() -> None:
    from kubetune.local.real_node_config import pause_image_archive

    archive = pause_image_archive(b"\x7fELF pause")
    assert archive == pause_image_archive(b"\x7fELF pause")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == PAUSE_IMAGE
    manifest = json.loads(files[f"blobs/sha256/{entry['digest'].split(':')[1]}"])
    (layer,) = manifest["layers"]
    with tarfile.open(
        fileobj=io.BytesIO(files[f"blobs/sha256/{layer['digest'].split(':')[1]}"])
    ) as tar:
        (pause,) = tar.getmembers()
    assert (pause.name, pause.mode) == ("pause", 0o755)
