"""Which Kubernetes API failures are worth a retry (kopf.TemporaryError) and which are not."""

from __future__ import annotations

import contextlib
import http.client
from collections.abc import Iterator
from typing import Final

import kopf
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

#: Seconds before kopf retries after a temporary failure, by HTTP status.
_RETRY_DELAYS: Final = {409: 1.0, 429: 10.0}
_DEFAULT_DELAY: Final = 5.0


def is_temporary(status: int | None) -> bool:
    return status is None or status in (408, 409, 429) or status >= 500


def translate(exc: ApiException, what: str) -> kopf.TemporaryError | kopf.PermanentError:
    """The kopf error for an API failure while doing ``what``."""
    status = exc.status if isinstance(exc.status, int) else None
    detail = f"{what}: {status} {exc.reason}"
    if is_temporary(status):
        return kopf.TemporaryError(detail, delay=_RETRY_DELAYS.get(status or 0, _DEFAULT_DELAY))
    return kopf.PermanentError(detail)


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Turn API and connection failures inside the block into kopf's retry semantics."""
    try:
        yield
    except ApiException as exc:
        raise translate(exc, what) from exc
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
        # No answer: refused, reset, timed out, a TLS failure, a broken response.
        raise kopf.TemporaryError(f"{what}: {exc}", delay=_DEFAULT_DELAY) from exc
