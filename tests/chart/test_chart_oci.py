"""The chart as an OCI artifact, as GitOps tools install charts today: `make chart` packages it,
helm pushes the package to a real registry (distribution's, with a login) and takes it back by
its oci:// reference; what it renders from there is what the chart folder renders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chartkit import CHART, Helm

from kubetune_devtools.installs import push_chart


def test_the_packaged_chart_goes_to_a_registry_and_renders_the_same_from_it(
    helm: Helm, oci_registry: Any, tmp_path: Path
) -> None:
    reference, version, login = push_chart(helm, oci_registry, tmp_path)
    # A certificate of the platform's own: the chart would otherwise make a new one each render.
    fixed = ("-n", "kubetune-system", "--set", "progress.tls.secretName=kubetune-progress-tls")
    from_registry = helm("template", "kt", reference, "--version", version, *fixed, *login)
    from_folder = helm("template", "kt", str(CHART), *fixed)
    assert from_registry.returncode == 0, from_registry.stderr
    assert from_registry.stdout == from_folder.stdout

    manifest = oci_registry.manifest(f"{oci_registry.host}/charts/kubetune:{version}")
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.helm.config.v1+json"
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
