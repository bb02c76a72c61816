"""The OpenAI routes over the real job service and runner (fakeredis), with a scripted engine."""

import json
import time

import pytest

from tests.api.conftest import SERVED_MODEL
from tests.api.scripted_work import ScriptedReply

MODEL = SERVED_MODEL
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture
def reply(celery) -> ScriptedReply:
    celery.work = ScriptedReply(["Hel", "lo", " there"], finish_reason="length")
    return celery.work


def _sse_data(response) -> list:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_models_lists_the_loaded_model_and_the_aliases(client, heartbeat, settings):
    settings.served_model_aliases = ["gpt-4o-mini"]
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(card["id"], card["owned_by"]) for card in body["data"]] == [
        (MODEL, "moeserve"),
        ("gpt-4o-mini", "moeserve"),
    ]
    assert body["data"][0]["created"] == int(heartbeat.started_at) and body["data"][0]["object"] == "model"


def test_models_is_empty_without_a_ready_worker(client):
    assert client.get("/v1/models").json() == {"object": "list", "data": []}


def test_chat_completion_carries_the_messages_and_options_to_the_worker(client, heartbeat, reply):
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 3,
            "stop": "\n\n",
            "user": "someone",
            "n": 1,
            "logprobs": False,
            "timeout": 30,
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Again"},
            ],
        },
    )
    assert response.status_code == 200, response.text
    params = reply.params[0]
    assert params["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    assert params["prompt"] == "" and params["max_tokens"] == 7
    assert (params["temperature"], params["top_p"], params["seed"], params["stop"]) == (0.5, 0.9, 3, ["\n\n"])
    assert time.time() < params["deadline"] <= time.time() + 30


def test_chat_completion_answers_in_openai_shape(client, heartbeat, reply):
    body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert reply.params[0]["temperature"] == 1.0 and reply.params[0]["top_p"] == 1.0  # OpenAI's defaults


def test_an_alias_is_accepted_and_echoed(client, heartbeat, reply, settings):
    settings.served_model_aliases = ["gpt-4o-mini"]
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o-mini"}).json()["model"] == "gpt-4o-mini"


def test_streamed_chunks_add_up_to_the_text_then_usage_then_done(client, heartbeat, reply):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        data = _sse_data(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(chunk["choices"][0]["delta"]["content"] or "" for chunk in chunks[:-1]) == "Hello there"
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks[:-1]] == [None] * 4 + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["id"] == chunks[0]["id"] for chunk in chunks)


def test_a_stream_without_include_usage_has_no_usage(client, heartbeat, reply):
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        chunks = [json.loads(item) for item in _sse_data(response)[:-1]]
    assert all("usage" not in chunk for chunk in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completions_send_the_raw_prompt_without_the_chat_template(client, heartbeat, reply):
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": ["Once upon"], "max_tokens": 5}).json()
    assert reply.params[0]["prompt"] == "Once upon" and reply.params[0]["apply_chat_template"] is False
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Hello there"
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}) as response:
        chunks = [json.loads(item) for item in _sse_data(response)[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "Hello there"


def test_a_deadline_cut_is_length_with_an_error_field(client, heartbeat, celery):
    celery.work = ScriptedReply(["Hel"], finish_reason="timeout")
    body = client.post("/v1/chat/completions", json={**CHAT, "timeout": 5}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["error"]["type"] == "timeout_error" and "deadline" in body["error"]["message"]


def test_a_job_the_deadline_stopped_before_it_started_is_504(client, heartbeat, celery):
    celery.work = ScriptedReply([], finish_reason="timeout")
    response = client.post("/v1/chat/completions", json={**CHAT, "timeout": 5})
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"


def test_a_job_still_queued_at_its_deadline_is_504_and_leaves_the_queue(client, heartbeat, celery):
    celery.hold = True
    started = time.monotonic()
    response = client.post("/v1/chat/completions", json={**CHAT, "timeout": 0.3})
    assert response.status_code == 504 and time.monotonic() - started < 3
    assert set(response.json()["error"]) == OPENAI_ERROR_KEYS and response.json()["error"]["param"] == "timeout"
    job_id = celery.sent[0][1][0]
    assert client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "fragment"),
    [
        ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "n", "n=2 is not supported"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs", "not supported"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
        ("/v1/chat/completions", {**CHAT, "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
                ],
            },
            400,
            "messages.0.content",
            "image_url",
        ),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", ""),
        ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "at least 1"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "required"),
        ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
        ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 100_000}, 400, "max_tokens", "between 1 and 512"),
        ("/v1/chat/completions", {**CHAT, "timeout": 100_000}, 400, "timeout", "JOB_TIMEOUT_S"),
        ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
        ("/v1/chat/completions", {**CHAT, "bogus": 1}, 400, "bogus", "unknown field"),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model", "does not exist"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", "batch of 2 prompts"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo", "not supported"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 2]}, 400, "prompt", "string"),
    ],
)
def test_every_bad_request_gets_an_openai_error_naming_the_parameter(
    client, heartbeat, celery, path, body, status, param, fragment
):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    error = response.json()["error"]
    assert set(error) == OPENAI_ERROR_KEYS and error["param"] == param and fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == ("model_not_found" if status == 404 else None)
    assert celery.sent == []


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("POST", "/v1/chat/completions", b'{"model": ', 400),
        ("POST", "/v1/chat/completions", b"", 400),
        ("GET", "/v1/chat/completions", None, 405),
        ("GET", "/v1/nothing-here", None, 404),
    ],
)
def test_malformed_requests_and_unknown_routes_under_v1_are_openai_errors(
    client, heartbeat, method, path, content, status
):
    response = client.request(method, path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert set(response.json()) == {"error"} and set(response.json()["error"]) == OPENAI_ERROR_KEYS


def test_no_worker_is_503_in_openai_shape(client, celery):
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503 and set(response.json()["error"]) == OPENAI_ERROR_KEYS
    assert celery.sent == []


def test_the_native_routes_keep_the_native_envelope(client, heartbeat):
    error = client.post("/inference", json={"prompt": "x", "n": 2}).json()["error"]
    assert error["code"] == 400 and error["param"] == "n"
