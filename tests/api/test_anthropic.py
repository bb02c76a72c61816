"""The Anthropic Messages route over the real job service and runner (fakeredis), with a scripted engine."""

import json

import pytest
import redis.exceptions

from api.services.jobs import JobService
from tests.api.conftest import SERVED_MODEL
from tests.api.scripted_work import ScriptedReply

MODEL = SERVED_MODEL
MESSAGE = {"model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def reply(celery) -> ScriptedReply:
    celery.work = ScriptedReply(["Hel", "lo"], finish_reason="stop", stop_sequence="\n\n")
    return celery.work


def test_a_message_carries_system_messages_and_options_to_the_worker(client, heartbeat, reply):
    response = client.post(
        "/v1/messages",
        headers={"x-api-key": "anything", "anthropic-version": "2023-06-01"},
        json={
            **MESSAGE,
            "system": [{"type": "text", "text": "Be brief."}],
            "temperature": 0.2,
            "top_p": 0.8,
            "stop_sequences": ["\n\n"],
            "metadata": {"user_id": "u1"},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Again"},
            ],
        },
    )
    assert response.status_code == 200, response.text
    params = reply.params[0]
    assert params["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    assert (params["max_tokens"], params["temperature"], params["top_p"], params["stop"]) == (20, 0.2, 0.8, ["\n\n"])


@pytest.mark.parametrize(
    ("finish_reason", "stop_sequence", "stop_reason"),
    [("stop", "\n\n", "stop_sequence"), ("stop", None, "end_turn"), ("length", None, "max_tokens")],
)
def test_a_message_answers_in_anthropic_shape(client, heartbeat, celery, finish_reason, stop_sequence, stop_reason):
    celery.work = ScriptedReply(["Hel", "lo"], finish_reason=finish_reason, stop_sequence=stop_sequence)
    body = client.post("/v1/messages", json=MESSAGE).json()
    assert body == {
        "id": body["id"],
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": 4, "output_tokens": 2},
        "error": None,
    }
    assert body["id"].startswith("msg_")


def test_the_stream_sends_anthropic_events_in_order(client, heartbeat, reply):
    with client.stream("POST", "/v1/messages", json={**MESSAGE, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith(("event:", "data:"))]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    data = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [item["type"] for item in data] == names
    assert "".join(item["delta"]["text"] for item in data if item["type"] == "content_block_delta") == "Hello"
    assert data[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "\n\n"}
    assert data[-2]["usage"] == {"input_tokens": 4, "output_tokens": 2}
    assert data[0]["message"]["content"] == [] and "error" not in data[0]["message"]


def test_a_deadline_cut_ends_the_stream_with_an_error_event(client, heartbeat, celery):
    celery.work = ScriptedReply(["Hel"], finish_reason="timeout")
    with client.stream("POST", "/v1/messages", json={**MESSAGE, "stream": True, "timeout": 5}) as response:
        lines = [line for line in response.iter_lines() if line.startswith(("event:", "data:"))]
    assert lines[-2] == "event: error"
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["type"] == "timeout_error"
    assert json.loads(lines[-3].removeprefix("data: "))["delta"]["stop_reason"] == "max_tokens"


def test_redis_lost_mid_stream_ends_the_stream_with_an_error_event(client, heartbeat, reply, monkeypatch):
    """Not a dropped connection (which clients report as a protocol error): the stream's last event says why."""
    real_events = JobService.events

    async def events_then_redis_down(self, job_id, timeout_s):
        async for event in real_events(self, job_id, timeout_s):
            yield event
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(JobService, "events", events_then_redis_down)
    with client.stream("POST", "/v1/messages", json={**MESSAGE, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith(("event:", "data:"))]
    assert "event: content_block_delta" in lines  # the first token went out before Redis went away
    assert lines[-2] == "event: error"
    assert "Redis" in json.loads(lines[-1].removeprefix("data: "))["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "error_type", "fragment"),
    [
        ({**MESSAGE, "max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
        ({"model": MODEL, "messages": MESSAGE["messages"]}, 400, "invalid_request_error", "max_tokens"),
        ({**MESSAGE, "top_k": 5}, 400, "invalid_request_error", "top_k is not supported"),
        ({**MESSAGE, "tools": [{"name": "x"}]}, 400, "invalid_request_error", "tools is not supported"),
        (
            {**MESSAGE, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            "invalid_request_error",
            "'image' is not supported",
        ),
        ({**MESSAGE, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error", "role"),
        ({**MESSAGE, "temperature": 1.5}, 400, "invalid_request_error", "temperature"),
        ({**MESSAGE, "stop_sequences": ["1", "2", "3", "4", "5"]}, 400, "invalid_request_error", "stop_sequences"),
        ({**MESSAGE, "model": "claude-3-haiku"}, 404, "not_found_error", "does not exist"),
    ],
)
def test_every_bad_request_gets_an_anthropic_error(client, heartbeat, celery, body, status, error_type, fragment):
    response = client.post("/v1/messages", json=body)
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"type", "error"} and payload["type"] == "error"
    assert set(payload["error"]) == {"type", "message"} and payload["error"]["type"] == error_type
    assert fragment in payload["error"]["message"]
    assert celery.sent == []


def test_invalid_json_and_no_worker_are_anthropic_errors(client, celery):
    response = client.post("/v1/messages", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = client.post("/v1/messages", json=MESSAGE)
    assert response.status_code == 503 and response.json()["type"] == "error"
