"""API keys: every endpoint but /health wants one, a job is seen only by the key that submitted it, and no key
is ever written down."""

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.services.auth import KeyRing
from tests.api.conftest import SERVED_MODEL

ALICE, BOB, ADMIN = "sk-alice-0123456789", "sk-bob-9876543210", "sk-admin-5555"


@pytest.fixture
def keyed(server, settings, celery, heartbeat, tmp_path):
    import fakeredis

    key_file = tmp_path / "keys"
    key_file.write_text(f"# one per line\n{BOB}\n\n")
    settings = settings.model_copy(update={"api_keys": [ALICE], "api_keys_file": key_file, "admin_api_keys": [ADMIN]})
    app = create_app(
        settings, redis_client=fakeredis.FakeAsyncRedis(server=server, decode_responses=True), celery=celery
    )
    with TestClient(app) as client:
        yield client
    celery.join()


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_without_a_key_every_endpoint_but_health_is_401_in_its_own_dialect(keyed):
    assert keyed.get("/health").status_code == 200
    for method, path in [
        ("post", "/inference"),
        ("get", "/jobs/x"),
        ("delete", "/jobs/x"),
        ("get", "/metrics"),
        ("get", "/metrics/prometheus"),
        ("post", "/benchmark"),
    ]:
        response = keyed.request(method, path, json={"prompt": "x"})
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error" and response.headers["www-authenticate"]
    response = keyed.get("/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    response = keyed.post("/v1/messages", json={})
    assert response.status_code == 401 and response.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": response.json()["error"]["message"]},
    }


def test_a_wrong_key_is_401_and_never_echoed(keyed):
    wrong = "sk-alice-0123456780"  # one character off
    for headers in (_as(wrong), {"x-api-key": wrong}, {"Authorization": f"Basic {ALICE}"}):
        response = keyed.post("/inference", json={"prompt": "x"}, headers=headers)
        assert response.status_code == 401 and wrong not in response.text and ALICE not in response.text


def test_keys_from_the_setting_the_file_and_anthropic_s_header_all_work(keyed):
    assert keyed.post("/inference", json={"prompt": "hi", "max_tokens": 3}, headers=_as(ALICE)).status_code == 200
    assert keyed.post("/inference", json={"prompt": "hi", "max_tokens": 3}, headers=_as(BOB)).status_code == 200
    message = {"model": SERVED_MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    assert keyed.post("/v1/messages", json=message, headers={"x-api-key": ALICE}).status_code == 200
    assert keyed.get("/v1/models", headers=_as(BOB)).status_code == 200


def test_a_job_is_visible_only_to_the_key_that_submitted_it_and_to_an_admin(keyed, celery):
    celery.hold = True
    accepted = keyed.post("/inference", json={"prompt": "x"}, headers={**_as(ALICE), "Prefer": "respond-async"})
    job = accepted.headers["location"]
    assert keyed.get(job, headers=_as(ALICE)).json()["status"] == "queued"
    for attempt in (keyed.get(job, headers=_as(BOB)), keyed.delete(job, headers=_as(BOB))):
        assert attempt.status_code == 404 and attempt.json()["error"]["type"] == "not_found_error"  # not 403
    assert keyed.get(job, headers=_as(ADMIN)).status_code == 200
    assert keyed.delete(job, headers=_as(ALICE)).json()["status"] == "cancelled"


def test_no_key_is_written_to_redis(keyed, sync_redis):
    keyed.post("/inference", json={"prompt": "secret?", "max_tokens": 3}, headers=_as(ALICE))
    keyed.post(
        "/v1/messages",
        json={"model": SERVED_MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": BOB},
    )
    stored = []
    for key in sync_redis.scan_iter():
        stored.append(key)
        kind = sync_redis.type(key)
        if kind == "hash":
            stored += [f"{k}={v}" for k, v in sync_redis.hgetall(key).items()]
        elif kind == "stream":
            stored += [str(entry) for entry in sync_redis.xrange(key)]
    dump = "\n".join(stored)
    assert "client" in dump and ALICE not in dump and BOB not in dump


def test_an_open_service_needs_no_key_and_every_caller_sees_every_job(client, heartbeat):
    assert not KeyRing([], []).enabled
    job = client.post("/inference", json={"prompt": "x"}, headers={"Prefer": "respond-async"}).headers["location"]
    assert client.get(job).status_code == 200 and client.get(job, headers=_as("anything")).status_code == 200
