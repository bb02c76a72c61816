"""Checks every dialect makes on a generation request, against the limits in the settings."""

import time

from api.errors import invalid_request
from shared.config import Settings
from shared.schemas import MAX_STOP_STRINGS


def checked_max_tokens(value: int | None, settings: Settings, param: str = "max_tokens") -> int:
    max_tokens = settings.max_tokens_default if value is None else value
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        raise invalid_request(f"{param} must be between 1 and {settings.max_tokens_limit}, got {max_tokens}", param)
    return max_tokens


def checked_prompt_length(chars: int, settings: Settings, param: str) -> None:
    if chars > settings.max_prompt_chars:
        raise invalid_request(f"{param} is {chars} characters; the limit is {settings.max_prompt_chars}", param)


def checked_stop(value: str | list[str] | None, param: str = "stop") -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid_request(f"{param} takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param)
    if any(not stop for stop in stops):
        raise invalid_request(f"{param} strings must not be empty", param)
    return stops


def request_deadline(timeout_s: float | None, settings: Settings, param: str = "timeout") -> float | None:
    """A request's `timeout` (seconds from now) -> the epoch deadline its job carries."""
    if timeout_s is None:
        return None
    if not 0 < timeout_s <= settings.job_timeout_s:
        raise invalid_request(
            f"{param} must be more than 0 and at most {settings.job_timeout_s:g} s (JOB_TIMEOUT_S), got {timeout_s:g}",
            param,
        )
    return time.time() + timeout_s
