"""Generated requests over the app's whole OpenAPI schema: no 5xx, and every 4xx in its dialect's envelope."""

import json

import schemathesis
from hypothesis import HealthCheck, settings

from api.main import create_app
from shared.config import Settings

schema = schemathesis.openapi.from_dict(create_app(Settings(_env_file=None)).openapi())

OPENAI_KEYS = {"message", "type", "param", "code"}


def _in_its_envelope(path: str, body: object) -> bool:
    if path == "/v1/messages":
        return isinstance(body, dict) and body.get("type") == "error" and set(body["error"]) == {"type", "message"}
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and set(error) == OPENAI_KEYS and bool(error["message"])


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_4xx_in_its_envelope(case, client, heartbeat):
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    response = client.request(
        kwargs["method"],
        kwargs["url"],
        params=kwargs.get("params"),
        headers={key: str(value) for key, value in (kwargs.get("headers") or {}).items()},
        content=json.dumps(kwargs["json"]) if "json" in kwargs else kwargs.get("data"),
    )
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    if 400 <= response.status_code < 500:
        assert _in_its_envelope(case.path, response.json()), (case.path, response.text[:500])
