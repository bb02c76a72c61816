"""One error envelope, `{"error": {message, type, param, code}}`, for every failure the API reports."""

import logging

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
    ):
        super().__init__(message)
        self.status_code = status_code
        self.type = type_
        self.message = message
        self.param = param
        self.headers = headers

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
def error_responses(*codes: int) -> dict[int | str, dict]:
    return {code: {"model": ErrorResponse} for code in codes}


def _describe_validation_error(error: dict) -> tuple[str | None, str]:
    path = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    field = ".".join(path) or None
    kind = error.get("type")
    if kind == "extra_forbidden":
        return field, f"unknown field '{field}'"
    if kind == "json_invalid":
        return None, f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    if kind == "missing" and field is None:
        return None, "a JSON request body is required"
    return field, f"{field}: {error['msg']}" if field else error["msg"]


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    described = [_describe_validation_error(error) for error in exc.errors()]
    message = "; ".join(text for _, text in described) or "invalid request"
    return error_response(400, ErrorType.INVALID_REQUEST, message, described[0][0] if described else None)


async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = ErrorType.NOT_FOUND if exc.status_code == 404 else ErrorType.INVALID_REQUEST
    return error_response(exc.status_code, type_, str(exc.detail), headers=getattr(exc, "headers", None))


async def _on_redis_error(_: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
    log.error("Redis unavailable: %s", exc)
    return error_response(503, ErrorType.SERVICE_UNAVAILABLE, f"the job store (Redis) is unavailable: {exc}")


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return error_response(500, ErrorType.INFERENCE, f"internal error: {type(exc).__name__}: {exc}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(redis.exceptions.RedisError, _on_redis_error)
    app.add_exception_handler(Exception, _on_unexpected)
