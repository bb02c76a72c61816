"""OpenAI's error envelope, `{"error": {message, type, param, code}}`, for every error under `/v1/`."""

from fastapi.responses import JSONResponse

from api.errors import APIError
from api.openai.protocol import OpenAIErrorDetail, OpenAIErrorResponse
from shared.schemas import ErrorType

# OpenAI reports bad requests, unknown models and bad keys alike as invalid requests; the status code tells them
# apart.
_OPENAI_TYPE = {ErrorType.NOT_FOUND: "invalid_request_error", ErrorType.AUTHENTICATION: "invalid_request_error"}
_DEFAULT_CODE = {429: "rate_limit_exceeded"}


def openai_error(error: APIError) -> OpenAIErrorDetail:
    return OpenAIErrorDetail(
        message=error.message,
        type=_OPENAI_TYPE.get(error.type, error.type.value),
        param=error.param,
        code=error.code or _DEFAULT_CODE.get(error.status_code),
    )


def openai_error_response(error: APIError) -> JSONResponse:
    body = OpenAIErrorResponse(error=openai_error(error))
    return JSONResponse(body.model_dump(mode="json"), status_code=error.status_code, headers=error.headers)
