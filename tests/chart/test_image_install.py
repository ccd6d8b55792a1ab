"""The images, built for real from the Dockerfile with buildah (hack/images/build.sh, cached by
content, bases stood in for by Debian-package images): what they install, and that the build's
proxy CA never lands in a layer. tests/local/test_images.py runs them as pods."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import pytest

from kubetune_devtools.installs import built_images, project_version

pytestmark = pytest.mark.integration

VERSION = project_version()
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


@pytest.fixture(scope="module")
def operator_image() -> Path:
    store = built_images("operator")
    return store / urllib.parse.quote(f"kubetune/operator:{VERSION}", safe="")


def certificates(bundle: Path) -> set[bytes]:
    return {b"".join(body.split()) for body in PEM.findall(bundle.read_bytes())}


def test_operator_image_holds_the_operator_its_version_file_and_no_training_stack(
    operator_image: Path,
) -> None:
    rootfs = operator_image / "bundle" / "rootfs"

    assert (rootfs / "opt/kubetune/IMAGE-VERSION").read_text().split() == [
        "kubetune-operator", VERSION
    ]  # fmt: skip
    assert (rootfs / "opt/kubetune/bin/kubetune-operator").exists()
    site = next((rootfs / "opt/kubetune/lib").glob("python3*/site-packages"))
    assert (site / "kopf").is_dir() and (site / "kubetune" / "operator").is_dir()
    assert not (site / "torch").exists()


def test_the_build_time_ca_bundle_is_in_no_layer_of_the_image(operator_image: Path) -> None:
    # The certificates this host trusts beyond Debian's own (a TLS-intercepting proxy's CA) were
    # mounted into the build as a secret; none of them may be in any layer, deleted or not: each
    # layer's own files are read (the store lists where they are), not the flattened root.
    image_bundle = operator_image / "bundle/rootfs/etc/ssl/certs/ca-certificates.crt"
    extra = certificates(HOST_CA_BUNDLE) - certificates(image_bundle)
    layers = [Path(line) for line in (operator_image / "layers").read_text().splitlines()]

    assert len(layers) >= 3 and all(layer.is_dir() for layer in layers)
    for layer in layers:
        for file in (f for f in layer.rglob("*") if f.is_file() and not f.is_symlink()):
            content = file.read_bytes()
            for certificate in extra:
                assert certificate[:64] not in content, f"a host-only CA certificate is in {file}"
