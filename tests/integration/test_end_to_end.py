"""The whole path for real: HTTP -> FastAPI -> Redis -> Celery worker -> bundled model -> back."""

import json
import time

import pytest

from shared.celery_app import create_celery_app
from shared.config import Settings
from shared.task_names import INFERENCE_TASK

pytestmark = pytest.mark.integration

SPEC_FIELDS = {"text", "tokens_generated", "generation_time", "tokens_per_second", "memory_used_gb"}


def _poll(stack, job_id: str, until: set[str], timeout_s: float = 120) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = stack.http.get(f"/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {until}: {job}")


def test_health_was_503_while_the_model_loaded_then_200(stack):
    assert stack.health_while_loading, "the worker was ready before the first health check"
    code, body = stack.health_while_loading[0]
    assert code == 503 and body["model_ready"] is False and body["status"] == "unhealthy"
    body = stack.http.get("/health").json()
    assert body["status"] == "healthy" and body["model_ready"] is True and body["memory_sufficient"] is True


def test_no_worker_means_503_for_health_and_inference(api_without_worker):
    assert api_without_worker.http.get("/health").status_code == 503
    response = api_without_worker.http.post("/inference", json={"prompt": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "model_not_ready_error"


def test_inference_generates_real_text_with_the_spec_fields(stack):
    response = stack.http.post(
        "/inference", json={"prompt": "Why is the sky blue?", "max_tokens": 40, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == SPEC_FIELDS
    assert 0 < body["tokens_generated"] <= 40
    assert body["tokens_per_second"] > 0 and body["generation_time"] > 0 and body["memory_used_gb"] > 0
    words = body["text"].lower().split()
    assert len(words) >= 10
    assert any(word.strip(".,") in {"light", "sunlight", "scattering", "blue", "sky", "atmosphere"} for word in words)


def test_the_worker_logs_no_completion_text(stack):
    """Celery logs what a task returns ("Task ... succeeded in ...: <value>"): a summary, not the answer."""
    response = stack.http.post("/inference", json={"prompt": "Name three colours.", "max_tokens": 24, "temperature": 0})
    assert response.status_code == 200, response.text
    text = response.json()["text"].strip()
    assert len(text) >= 10
    log = stack.log_dir / "worker.log"
    deadline = time.monotonic() + 10  # Celery writes its line once the task has returned
    while "succeeded in" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    written = log.read_text()
    assert "succeeded in" in written and "'finish_reason'" in written
    assert text not in written and "'text'" not in written


def test_greedy_decoding_is_deterministic_through_the_queue(stack):
    body = {"prompt": "List three fruits.", "max_tokens": 16, "temperature": 0}
    first, second = (stack.http.post("/inference", json=body).json()["text"] for _ in range(2))
    assert first == second and first


def test_streaming_sends_the_same_text_as_token_events(stack):
    tokens, done = [], None
    with stack.http.stream(
        "POST", "/inference", json={"prompt": "Say hello.", "max_tokens": 12, "temperature": 0, "stream": True}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
                if event == "token":
                    tokens.append(data["text"])
                elif event == "done":
                    done = data
    assert done is not None and set(done) == SPEC_FIELDS
    assert "".join(tokens) == done["text"] and len(tokens) >= 2


def test_async_submission_returns_202_and_polling_gets_the_result(stack):
    response = stack.http.post(
        "/inference", json={"prompt": "Name a planet.", "max_tokens": 8}, headers={"Prefer": "respond-async"}
    )
    assert response.status_code == 202
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/jobs/{job_id}"
    job = _poll(stack, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["attempts"] == 1 and job["worker"]
    assert set(job["result"]) >= SPEC_FIELDS and job["result"]["text"]
    assert stack.http.get("/jobs/0123456789abcdef").status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 100_000}, "max_tokens"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_k": 5}, "top_k"),
    ],
)
def test_bad_inputs_get_400_with_one_error_shape(stack, body, param):
    response = stack.http.post("/inference", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_a_prompt_longer_than_the_context_is_400(stack):
    response = stack.http.post("/inference", json={"prompt": "blue sky " * 6000, "max_tokens": 4})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "context" in error["message"]


def test_curl_style_body_works(stack):
    response = stack.http.post(
        "/inference",
        content=b'{"prompt": "Hi", "max_tokens": 3}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200 and response.json()["tokens_generated"] > 0


def test_a_worker_exception_fails_the_job_and_the_worker_keeps_serving(stack):
    # Bypass the API's validation: a malformed task payload makes the task itself raise.
    settings = Settings(redis_url=stack.redis_url, _env_file=None)
    stack.redis.hset(
        f"{stack.prefix}:job:broken",
        mapping={"kind": "inference", "status": "queued", "created_at": str(time.time()), "params": "{}"},
    )
    create_celery_app(settings).send_task(
        INFERENCE_TASK, args=["broken", {"prompt": 1}], task_id="broken", queue=stack.prefix
    )
    job = _poll(stack, "broken", {"failed", "succeeded"})
    assert job["status"] == "failed" and job["error"]["type"] == "inference_error"
    assert "ValidationError" in job["error"]["message"]
    assert stack.http.post("/inference", json={"prompt": "Still there?", "max_tokens": 4}).status_code == 200


def test_metrics_count_each_job(stack):
    before = stack.http.get("/metrics").json()
    for _ in range(2):
        assert stack.http.post("/inference", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200
    after = stack.http.get("/metrics").json()
    assert after["total_inferences"] == before["total_inferences"] + 2
    assert after["model_loaded"] is True and after["avg_tokens_per_second"] > 0
    assert after["system_memory_used_gb"] > 0 and after["uptime_seconds"] > 0
    assert stack.http.get("/health").json()["last_inference"] is not None


def test_a_running_job_can_be_cancelled(stack):
    job_id = stack.http.post(
        "/inference",
        json={"prompt": "Write a very long essay about the sea.", "max_tokens": 2000, "temperature": 0},
        headers={"Prefer": "respond-async"},
    ).json()["id"]
    _poll(stack, job_id, {"running"})
    time.sleep(0.5)
    assert stack.http.delete(f"/jobs/{job_id}").status_code == 200
    job = _poll(stack, job_id, {"cancelled", "succeeded", "failed"}, timeout_s=20)
    assert job["status"] == "cancelled" and job["error"]["type"] == "cancelled_error"
    assert 0 < job["result"]["tokens_generated"] < 2000


def test_benchmark_runs_through_the_queue(stack):
    response = stack.http.post("/benchmark", json={"test_type": "standard", "iterations": 2})
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["benchmark_type"] == "standard" and report["iterations"] == 2
    assert len(report["test_prompts"]) == 2
    assert report["min_tokens_per_second"] <= report["p95_tokens_per_second"] <= report["max_tokens_per_second"]
    assert stack.http.post("/benchmark", json={"test_type": "nope"}).status_code == 400
