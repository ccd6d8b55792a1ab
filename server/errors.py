"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
status the SDK maps to its exception classes (401 AuthenticationError, 403
PermissionDeniedError, 404 NotFoundError, 400 BadRequestError...)."""

from __future__ import annotations

from typing import Any

#: The OpenAI error ``type`` for each status the server answers with.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


class ApiError(Exception):
    """An answer other than success, in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "no valid credential: send a Kubernetes bearer token the API server accepts "
        "(Authorization: Bearer ...)",
        code="invalid_api_key",
    )


def not_found(what: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"no {what} {ident!r} in this project", code="not_found", param=param)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, code=code or "invalid_request", param=param)
