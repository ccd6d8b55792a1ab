"""oci:// output URIs: distribution's reference grammar, the tag a push gets, and the digest form
status shows."""

from __future__ import annotations

import pytest

from kubetune.api.uris import OUTPUT_SCHEMES, display_uri, oci_reference, parse_uri

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "host", "repository", "tag"),
    [
        ("oci://registry.example.com/team/adapter:v1", "registry.example.com", "team/adapter", "v1"),
        ("oci://127.0.0.1:5000/a/b/c", "127.0.0.1:5000", "a/b/c", "latest"),
        ("oci://Registry.Example.com/my_team/llama-2.7b__x:2026-12-05.1",
         "registry.example.com", "my_team/llama-2.7b__x", "2026-12-05.1"),
    ],
)  # fmt: skip
def test_a_reference_is_taken_apart_and_pinned_by_digest(
    uri: str, host: str, repository: str, tag: str
) -> None:
    reference = oci_reference(uri, "output")
    assert (reference.host, reference.repository, reference.tag) == (host, repository, tag)
    digest = "sha256:" + "ab" * 32
    assert reference.pinned(digest) == f"oci://{host}/{repository}@{digest}"
    assert parse_uri(uri, OUTPUT_SCHEMES, "output").scheme == "oci"


@pytest.mark.parametrize(
    "uri",
    [
        "oci://registry.example.com/Team/adapter",  # uppercase repository
        "oci://user:secret@registry.example.com/team/adapter",  # credentials
        "oci://registry.example.com/team/adapter@sha256:" + "ab" * 32,  # a digest: pushes tag
        "oci://registry.example.com",  # no repository
        "oci://registry.example.com/team/../adapter",
        "oci://registry.example.com/team//adapter",
        "oci://registry.example.com/team/adapter:" + "t" * 129,  # tag over 128
        "oci://registry.example.com/team/-adapter",
    ],
)
def test_what_is_not_a_pushable_reference_is_refused_without_showing_credentials(uri: str) -> None:
    with pytest.raises(ValueError, match="is not of the form oci://") as refused:
        parse_uri(uri, OUTPUT_SCHEMES, "output")
    assert "secret" not in str(refused.value)


def test_display_keeps_the_registry_port_and_drops_credentials() -> None:
    assert display_uri("oci://u:p@127.0.0.1:5000/team/a:v1") == "oci://127.0.0.1:5000/team/a:v1"
