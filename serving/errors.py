"""Gateway errors, always answered as the OpenAI error JSON `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError as PydanticValidationError


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        """The error as a JSON response."""
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def internal_error(request_id: str, code: str | None = "internal_error") -> APIError:
    """The 500 a client sees: a generic message with the request id, never the exception text (the
    gateway logs that with the same request id)."""
    return APIError(
        500,
        f"Internal gateway error (request id {request_id}); the gateway's log has the details",
        type="server_error",
        code=code or "internal_error",
        headers={"x-request-id": request_id},
    )


def unavailable_error(message: str) -> APIError:
    """503 `engine_unavailable` with `Retry-After: 2`: the client should retry shortly."""
    return APIError(
        503, message, type="server_error", code="engine_unavailable", headers={"Retry-After": "2"}
    )


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_path(loc: tuple[int | str, ...]) -> str | None:
    """`messages.0.content` from a pydantic location, without the union-member tags it may carry."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or not part.isidentifier()):
            break
        parts.append(str(part))
    return ".".join(parts) or None


def validation_error(error: PydanticValidationError) -> APIError:
    """The 400 for a request body that fails its pydantic model (first problem only, as OpenAI does)."""
    first = error.errors(include_url=False)[0]
    param = _param_path(first["loc"])
    if first["type"] == "extra_forbidden":
        return APIError(
            400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    return APIError(400, f"Invalid value for '{param}': {first['msg']}", param=param, code="invalid_value")
