"""Errors in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}, and which
engine exceptions become which HTTP status."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from misotts.engine import EngineBusy, EngineStopped

RETRY_AFTER_S = 1  # what a 429 tells the client to wait: the queue moves every frame (80 ms of audio)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def from_exception(err: BaseException) -> ApiError:
    """An exception raised while serving a request -> the error the client gets."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, EngineBusy):
        return ApiError(429, f"the server is busy: {err}", code="queue_full", type="rate_limit_error",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(err, EngineStopped):
        return ApiError(503, f"the engine is not serving: {err}", code="engine_stopped", type="server_error")
    if isinstance(err, (ValueError, TypeError)):  # the model refused the request (a prompt too long, ...)
        return ApiError(400, str(err), code="invalid_value")
    return ApiError(500, f"{type(err).__name__}: {err}", code="internal_error", type="server_error")


def error_kind(err: ApiError) -> str:
    """The label under which /metrics counts an error."""
    return err.code or str(err.status)
