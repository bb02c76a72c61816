import json

import pytest

from shared.schemas import WorkerState
from tests.api.conftest import SERVED_MODEL
from worker.engine.base import InvalidGenerationInput

SPEC_FIELDS = {"text", "tokens_generated", "generation_time", "tokens_per_second", "memory_used_gb"}


def test_inference_waits_and_returns_exactly_the_spec_fields(client, heartbeat, sync_redis, keys):
    response = client.post("/inference", json={"prompt": "hello world"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == SPEC_FIELDS
    assert body["text"] == "echo: hello world"
    assert body["tokens_generated"] == 3
    assert sync_redis.zcard(keys.arriving_jobs()) == 0  # sent: no longer counted as on its way


def test_inference_applies_defaults_from_settings(client, heartbeat, celery, settings):
    client.post("/inference", json={"prompt": "hi"})
    _, args = celery.sent[0]
    assert len(args) == 1  # the job id alone: the request stays in the record, out of the broker and Flower
    params = celery.params_of(0)
    assert params["max_tokens"] == settings.max_tokens_default
    assert params["temperature"] == 0.7


def test_curl_style_form_content_type_is_read_as_json(client, heartbeat):
    response = client.post(
        "/inference", content=b'{"prompt": "from curl"}', headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 200
    assert response.json()["text"] == "echo: from curl"


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "   \n"}, "prompt", "empty"),
        ({"prompt": 123}, "prompt", "string"),
        ({"prompt": ["a"]}, "prompt", "string"),
        ({}, "prompt", "required"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "x", "max_tokens": 513}, "max_tokens", "between 1 and 512"),
        ({"prompt": "x", "max_tokens": "10"}, "max_tokens", "integer"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens", "integer"),
        ({"prompt": "x", "temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"prompt": "x", "temperature": 2.01}, "temperature", "less than or equal to 2"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "number"),
        ({"prompt": "x", "stream": "yes"}, "stream", "boolean"),
        ({"prompt": "x", "max_token": 5}, "max_token", "unknown field 'max_token'"),
    ],
)
def test_invalid_parameters_get_400_naming_the_field(client, heartbeat, celery, body, param, fragment):
    response = client.post("/inference", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == 400
    assert error["param"] == param
    assert fragment in error["message"]
    assert celery.sent == []  # nothing was enqueued


def test_malformed_json_gets_400(client, heartbeat):
    response = client.post("/inference", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_no_worker_means_503_and_nothing_enqueued(client, celery):
    response = client.post("/inference", json={"prompt": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "model_not_ready_error"
    assert "no worker" in response.json()["error"]["message"]
    assert celery.sent == []


def test_worker_still_loading_means_503(client, heartbeat, celery):
    heartbeat.state = WorkerState.LOADING
    heartbeat.beat()
    response = client.post("/inference", json={"prompt": "hi"})
    assert response.status_code == 503
    assert "still loading" in response.json()["error"]["message"]


def test_full_queue_means_429_with_retry_after(client, heartbeat, sync_redis, keys, settings):
    sync_redis.rpush(keys.celery_queue(settings.queue_name), *["msg"] * settings.max_queue_depth)
    response = client.post("/inference", json={"prompt": "hi"})
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "queue_full_error"
    assert not list(sync_redis.scan_iter(keys.job("*")))  # a refused job leaves no record behind


def test_worker_exception_is_500_with_its_message(client, heartbeat, celery):
    def explode(context, params):
        raise RuntimeError("CUDA out of memory")

    celery.work = explode
    response = client.post("/inference", json={"prompt": "hi"})
    assert response.status_code == 500
    assert "CUDA out of memory" in response.json()["error"]["message"]


def test_prompt_the_model_rejects_is_400(client, heartbeat, celery):
    def too_long(context, params):
        raise InvalidGenerationInput("the prompt is 9000 tokens; the context is 8192", param="prompt")

    celery.work = too_long
    response = client.post("/inference", json={"prompt": "long"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


def test_stream_sends_token_events_then_done(client, heartbeat):
    with client.stream("POST", "/inference", json={"prompt": "a b", "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event:")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data:")]
    assert events == ["token", "token", "token", "done"]
    assert "".join(item["text"] for item in data[:-1]) == "echo: a b "
    assert set(data[-1]) == SPEC_FIELDS


def test_async_submission_returns_202_and_the_job_can_be_polled(client, heartbeat, celery):
    response = client.post("/inference", json={"prompt": "later"}, headers={"Prefer": "respond-async"})
    assert response.status_code == 202
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/jobs/{job_id}"
    celery.join()
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["result"]["text"] == "echo: later"
    assert job["attempts"] == 1


def test_unknown_job_is_404(client):
    response = client.get("/jobs/nope")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_cancelling_a_queued_job_finishes_it_and_wakes_waiters(client, heartbeat, celery):
    celery.hold = True
    job_id = client.post("/inference", json={"prompt": "x"}, headers={"Prefer": "respond-async"}).json()["id"]
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    # The worker later gets the message and must skip it.
    with celery.runner.claimed(job_id) as job:
        assert job is None
    assert client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    assert client.delete(f"/jobs/{job_id}").status_code == 409


def test_slow_job_answers_202_after_the_sync_timeout(client, heartbeat, celery, settings):
    celery.hold = True
    settings.sync_wait_timeout_s = 0.2
    response = client.post("/inference", json={"prompt": "x"})
    assert response.status_code == 202
    assert client.get(response.headers["location"]).json()["status"] == "queued"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/inference", {"prompt": "hello world"}),
        ("/v1/chat/completions", {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "hello world"}]}),
        ("/v1/completions", {"model": SERVED_MODEL, "prompt": "hello world"}),
        ("/v1/messages", {"model": SERVED_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}),
    ],
)
def test_only_a_streamed_response_has_its_tokens_published_as_events(
    client, heartbeat, celery, sync_redis, keys, path, body
):
    """A response that waits for the outcome reads only the job's end: token events would wake it for nothing."""
    for stream in (False, True):
        celery.sent.clear()
        with client.stream("POST", path, json=body | {"stream": stream}) as response:
            assert response.status_code == 200
            response.read()
        celery.join()
        _, (job_id,) = celery.sent[0]
        params = celery.params_of(0)
        assert params["stream_tokens"] is stream
        types = [fields["type"] for _, fields in sync_redis.xrange(keys.job_events(job_id))]
        assert ("token" in types) is stream and types[-1] == "done"
