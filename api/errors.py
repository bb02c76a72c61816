"""One error envelope, `{"error": {message, type, param, code}}`, for every failure the API reports.

Routes under another API's prefix (`/v1/...`) answer in that API's own envelope: `install_error_handlers`
takes a renderer per path prefix, and every handler here goes through it.
"""

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.schemas import ErrorDetail, ErrorResponse, ErrorType, JobError

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        type_: ErrorType,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.type = type_
        self.message = message
        self.param = param
        self.headers = headers
        self.code = code  # a machine-readable reason, for envelopes that carry one (OpenAI's "model_not_found")

    def response(self) -> JSONResponse:
        return error_response(self.status_code, self.type, self.message, self.param, self.headers)


def error_response(
    status_code: int, type_: ErrorType, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=status_code))
    return JSONResponse(body.model_dump(mode="json"), status_code=status_code, headers=headers)


def invalid_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, ErrorType.INVALID_REQUEST, message, param)


_STATUS_FOR_JOB_ERROR = {
    ErrorType.INVALID_REQUEST: 400,
    ErrorType.CANCELLED: 409,
    ErrorType.TIMEOUT: 504,
}


def from_job_error(error: JobError) -> APIError:
    """A failed job's recorded error -> what the waiting HTTP caller gets."""
    return APIError(_STATUS_FOR_JOB_ERROR.get(error.type, 500), error.type, error.message, error.param)


# Documented on each route so the OpenAPI schema shows the envelope.
def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


# The member of a union a value failed, which pydantic puts in the error's location: "prompt.list[str].0".
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|[\w-]+\[.*\])$")


def _describe_validation_error(error: dict[str, Any]) -> tuple[str | None, str]:
    path = [
        str(part)
        for part in error.get("loc", ())
        if part not in ("body", "query", "path", "header") and not _UNION_MEMBER.match(str(part))
    ]
    field = ".".join(path) or None
    kind = error.get("type")
    if kind == "extra_forbidden":
        return field, f"unknown field '{field}'"
    if kind == "unsupported_parameter":  # its message names the parameter already
        return field, error["msg"]
    if kind == "json_invalid":
        return None, f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    if kind == "missing" and field is None:
        return None, "a JSON request body is required"
    return field, f"{field}: {error['msg']}" if field else error["msg"]


def validation_error(exc: RequestValidationError) -> APIError:
    described = [_describe_validation_error(error) for error in exc.errors()]
    message = "; ".join(text for _, text in described) or "invalid request"
    return invalid_request(message, described[0][0] if described else None)


def _http_error(exc: StarletteHTTPException) -> APIError:
    type_ = ErrorType.NOT_FOUND if exc.status_code == 404 else ErrorType.INVALID_REQUEST
    return APIError(exc.status_code, type_, str(exc.detail), headers=getattr(exc, "headers", None))


def redis_unavailable(exc: redis.exceptions.RedisError) -> APIError:
    log.error("Redis unavailable: %s", exc)
    return APIError(503, ErrorType.SERVICE_UNAVAILABLE, f"the job store (Redis) is unavailable: {exc}")


def _unexpected(exc: Exception) -> APIError:
    log.exception("unhandled error")
    return APIError(500, ErrorType.INFERENCE, f"internal error: {type(exc).__name__}: {exc}")


ErrorRenderer = Callable[[APIError], JSONResponse]


def install_error_handlers(app: FastAPI, dialects: dict[str, ErrorRenderer] | None = None) -> None:
    """`dialects`: path prefix -> the envelope errors on those paths are rendered in (longest prefix wins);
    every other path gets the native one."""
    prefixes = sorted((dialects or {}).items(), key=lambda item: len(item[0]), reverse=True)

    def render(request: Request, error: APIError) -> JSONResponse:
        path = request.url.path
        renderer = next((renderer for prefix, renderer in prefixes if path.startswith(prefix)), APIError.response)
        return renderer(error)

    def handler(to_api_error: Callable[[Any], APIError]) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            return render(request, to_api_error(exc))

        return handle

    def as_is(exc: APIError) -> APIError:
        return exc

    app.add_exception_handler(RequestValidationError, handler(validation_error))
    app.add_exception_handler(APIError, handler(as_is))
    app.add_exception_handler(StarletteHTTPException, handler(_http_error))
    app.add_exception_handler(redis.exceptions.RedisError, handler(redis_unavailable))
    app.add_exception_handler(Exception, handler(_unexpected))
