"""API keys: who is calling, and which jobs they may see.

With no keys configured the service is open, as one anonymous client that sees every job. With keys, every
endpoint but `/health` wants one (`Authorization: Bearer <key>`, or `x-api-key` as Anthropic's clients send);
a job belongs to the key that submitted it, and other keys get 404 for it, as if it did not exist. Keys are
compared in constant time and never stored: a job records only a digest of its client's key.
"""

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from api.errors import APIError
from shared.config import Settings
from shared.schemas import ErrorType


@dataclass(frozen=True)
class Caller:
    client_id: str | None  # a digest of the caller's key; None when the service runs without keys
    admin: bool

    def may_see(self, job_client: str | None) -> bool:
        return self.admin or self.client_id is None or job_client == self.client_id


OPEN = Caller(client_id=None, admin=True)


class KeyRing:
    def __init__(self, keys: list[str], admin_keys: list[str]):
        self._keys = [(key.encode(), False) for key in keys] + [(key.encode(), True) for key in admin_keys]

    @classmethod
    def from_settings(cls, settings: Settings) -> "KeyRing":
        keys = list(settings.api_keys)
        if settings.api_keys_file is not None:
            lines = settings.api_keys_file.read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return cls(keys, list(settings.admin_api_keys))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, presented: str | None) -> Caller | None:
        """The caller a presented key names, or None for a missing or unknown key. Every configured key is
        compared, each in constant time, so the time taken says nothing about which one came close."""
        if not self.enabled:
            return OPEN
        if not presented:
            return None
        candidate = presented.encode()
        found: Caller | None = None
        for key, admin in self._keys:
            if hmac.compare_digest(candidate, key) and found is None:
                found = Caller(client_id=client_id(key), admin=admin)
        return found


def client_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:24]


def presented_key(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


async def authenticate(request: Request) -> Caller:
    """The route dependency (async: no thread hop, see api/deps.py): the caller, or 401 in the route's dialect."""
    keys: KeyRing = request.app.state.keys
    caller = keys.identify(presented_key(request))
    if caller is None:
        raise APIError(
            401,
            ErrorType.AUTHENTICATION,
            "a valid API key is required: send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
            headers={"WWW-Authenticate": "Bearer"},
            code="invalid_api_key",
        )
    return caller
