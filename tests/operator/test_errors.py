"""errors: which API failures kopf retries and which end the handler."""

from __future__ import annotations

import kopf
import pytest
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from kubetune.operator.errors import api_errors, translate

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("status", [408, 409, 429, 500, 503, 504])
def test_conflicts_throttling_and_server_errors_are_retried(status: int) -> None:
    error = translate(ApiException(status=status, reason="x"), "creating Job ns/a")
    assert isinstance(error, kopf.TemporaryError)
    assert "creating Job ns/a" in str(error)


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_client_errors_are_permanent(status: int) -> None:
    error = translate(ApiException(status=status, reason="x"), "creating Job ns/a")
    assert isinstance(error, kopf.PermanentError)


def test_throttling_waits_longer_than_a_conflict() -> None:
    throttled = translate(ApiException(status=429, reason="x"), "w")
    conflict = translate(ApiException(status=409, reason="x"), "w")
    assert isinstance(throttled, kopf.TemporaryError)
    assert isinstance(conflict, kopf.TemporaryError)
    assert throttled.delay is not None and conflict.delay is not None
    assert throttled.delay > conflict.delay


def test_connection_failures_and_timeouts_are_retried() -> None:
    with pytest.raises(kopf.TemporaryError), api_errors("reading"):
        raise urllib3.exceptions.MaxRetryError(None, "/", "connection refused")  # type: ignore[arg-type]
    with pytest.raises(kopf.TemporaryError), api_errors("reading"):
        raise TimeoutError("timed out")
