"""Anthropic's error envelope, `{"type": "error", "error": {type, message}}`, for every error on `/v1/messages`."""

from fastapi.responses import JSONResponse

from api.anthropic.protocol import AnthropicErrorDetail, AnthropicErrorResponse, AnthropicErrorType
from api.errors import APIError

_TYPE_FOR_STATUS: dict[int, AnthropicErrorType] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",  # no worker ready to take it
    504: "timeout_error",
}


def anthropic_error(error: APIError) -> AnthropicErrorDetail:
    fallback = "invalid_request_error" if error.status_code < 500 else "api_error"
    message = f"{error.param}: {error.message}" if error.param and error.param not in error.message else error.message
    return AnthropicErrorDetail(type=_TYPE_FOR_STATUS.get(error.status_code, fallback), message=message)


def anthropic_error_response(error: APIError) -> JSONResponse:
    body = AnthropicErrorResponse(error=anthropic_error(error))
    return JSONResponse(body.model_dump(mode="json"), status_code=error.status_code, headers=error.headers)
