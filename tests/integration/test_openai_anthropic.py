"""The OpenAI and Anthropic APIs for real, through their official clients: HTTP -> Redis -> worker -> model."""

import json
import time

import anthropic
import openai
import pytest

from worker.settings import BUNDLED_MODEL_ID as MODEL

pytestmark = pytest.mark.integration

GREETING = [{"role": "system", "content": "You are a friendly assistant."}, {"role": "user", "content": "Say hello."}]
COUNTING = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]


@pytest.fixture(scope="module")
def gpt(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="not-checked", max_retries=0)


@pytest.fixture(scope="module")
def claude(stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key="not-checked", max_retries=0)


def test_openai_client_lists_the_model_and_completes_a_raw_prompt(gpt):
    [model] = gpt.models.list().data
    assert model.id == MODEL and model.owned_by == "moeserve" and model.created > 0
    completion = gpt.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert completion.choices[0].text.strip() and completion.choices[0].finish_reason in ("stop", "length")
    usage = completion.usage
    assert 0 < usage.completion_tokens <= 4 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_adds_up_to_the_greedy_answer(gpt):
    answer = gpt.chat.completions.create(model=MODEL, messages=GREETING, max_tokens=10, temperature=0)
    chunks = list(
        gpt.chat.completions.create(
            model=MODEL,
            messages=GREETING,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert answer.choices[0].message.content and streamed == answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert answer.usage.prompt_tokens > 10  # the system turn went through the chat template too


def test_chat_stops_at_a_stop_sequence_without_returning_it(gpt):
    answer = gpt.chat.completions.create(model=MODEL, messages=COUNTING, max_tokens=30, temperature=0, stop=[", 5"])
    assert answer.choices[0].message.content == "1, 2, 3, 4" and answer.choices[0].finish_reason == "stop"


def test_a_seeded_sample_repeats(gpt):
    texts = {
        gpt.chat.completions.create(model=MODEL, messages=GREETING, max_tokens=8, temperature=1.0, seed=7)
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(texts) == 1 and texts != {""}


def test_unsupported_and_unknown_are_openai_errors(gpt):
    with pytest.raises(openai.BadRequestError) as error:
        gpt.chat.completions.create(model=MODEL, messages=GREETING, n=2)
    assert error.value.status_code == 400 and error.value.param == "n" and "n=2" in error.value.message
    with pytest.raises(openai.NotFoundError) as error:
        gpt.chat.completions.create(model="gpt-4o", messages=GREETING)
    assert error.value.code == "model_not_found"


def test_anthropic_client_creates_and_streams_a_message(claude):
    options = {
        "model": MODEL,
        "max_tokens": 10,
        "system": GREETING[0]["content"],
        "messages": [GREETING[1]],
        "extra_body": {"temperature": 0},  # sampling options are no longer keyword arguments of the client
    }
    message = claude.messages.create(**options)
    with claude.messages.stream(**options) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert message.content[0].text and streamed == message.content[0].text == final.content[0].text
    assert final.usage == message.usage and message.usage.input_tokens > 10
    assert message.stop_reason in ("end_turn", "max_tokens") and final.stop_reason == message.stop_reason
    with pytest.raises(anthropic.BadRequestError) as error:
        claude.messages.create(**{**options, "extra_body": {"top_k": 5}})
    assert error.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "top_k is not supported by this service"},
    }


def test_disconnecting_from_a_stream_cancels_its_job(stack):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    with stack.http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                job_id = json.loads(line.removeprefix("data: "))["id"].removeprefix("chatcmpl-")
                break
    deadline = time.time() + 30
    while (job := stack.http.get(f"/jobs/{job_id}").json())["status"] not in ("cancelled", "succeeded", "failed"):
        assert time.time() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "cancelled" and job["result"]["tokens_generated"] < 2000


def test_a_request_timeout_cuts_the_answer_short_with_an_error_field(stack):
    response = stack.http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
            "max_tokens": 2000,
            "temperature": 0,
            "timeout": 1,
        },
    )
    body = response.json()
    assert response.status_code == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["error"]["type"] == "timeout_error" and 0 < body["usage"]["completion_tokens"] < 2000


@pytest.mark.parametrize(
    ("path", "content", "status", "shape"),
    [
        ("/v1/chat/completions", b'{"model": ', 400, "openai"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "logprobs": 2}).encode(), 400, "openai"),
        ("/v1/nothing", b"{}", 404, "openai"),
        ("/v1/messages", json.dumps({"model": MODEL, "messages": GREETING[1:]}).encode(), 400, "anthropic"),
        (
            "/v1/messages",
            json.dumps({"model": "claude", "max_tokens": 5, "messages": GREETING[1:]}).encode(),
            404,
            "anthropic",
        ),
    ],
)
def test_every_4xx_is_in_its_dialect_s_shape(stack, path, content, status, shape):
    response = stack.http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    body = response.json()
    if shape == "openai":
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    else:
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
