"""A request's text stays in its job record and its client's response: not in the broker's message, the logs, or
Flower (real Redis, real worker, real Flower)."""

import base64
import json
import socket
import time
import uuid

import httpx
import pytest

from benchmarks.local_stack import BIN, LocalStack
from shared.redis_keys import RedisKeys
from tests.integration.conftest import FAST_HEARTBEAT

pytestmark = pytest.mark.integration
ASYNC = {"Prefer": "respond-async"}


def _marker() -> str:
    return f"zebra-{uuid.uuid4().hex[:12]}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _side_api(stack, queue: str) -> httpx.Client:
    """A second API on the stack's keys (it sees the live worker) whose messages go to `queue`, which no worker
    reads: they stay in the broker's list as it holds them."""
    port = _free_port()
    stack._spawn("api-side", [str(BIN / "uvicorn"), "api.main:app", "--port", str(port)], QUEUE_NAME=queue)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            client.get("/health")
            return client
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("the second API did not start: " + (stack.log_dir / "api-side.log").read_text())


def test_the_broker_message_carries_the_job_id_and_no_text(stack):
    queue = f"{stack.prefix}-unread"
    client = _side_api(stack, queue)
    marker = _marker()
    try:
        response = client.post("/inference", json={"prompt": f"Say {marker} twice.", "stop": [marker]}, headers=ASYNC)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        messages = stack.redis.lrange(RedisKeys.celery_queue(queue), 0, -1)
        assert len(messages) == 1
        body = base64.b64decode(json.loads(messages[0])["body"]).decode()
        assert json.loads(body)[0] == [job_id]  # the task's args: the job id alone
        assert marker not in messages[0] and marker not in body
        assert marker in stack.job(job_id)["params"]  # the record keeps the request for the worker
        assert stack.http.delete(f"/jobs/{job_id}").status_code == 200  # nobody will run it
    finally:
        stack.redis.delete(RedisKeys.celery_queue(queue))


def _start_flower(stack) -> str:
    port = _free_port()
    stack._spawn(
        "flower",
        [
            str(BIN / "celery"),
            "-A",
            "shared.celery_app:celery_app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        FLOWER_UNAUTHENTICATED_API="true",  # the task API, for this test only: the page is checked too
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # up, and already hearing this stack's worker's events
        try:
            workers = httpx.get(f"{url}/workers", params={"json": 1}, timeout=2).json()["data"]
            if any(stack.prefix in worker.get("hostname", "") for worker in workers):
                return url
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError("Flower never heard the worker: " + (stack.log_dir / "flower.log").read_text()[-2000:])


def _flower_task(url: str, task_id: str) -> dict:
    """Flower's record of the task once the worker's events have told it the task succeeded."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/api/task/info/{task_id}", timeout=5)
        if response.status_code == 200 and response.json().get("state") == "SUCCESS":
            return response.json()
        time.sleep(0.2)
    raise AssertionError(f"Flower never saw task {task_id} succeed")


@pytest.fixture(scope="module")
def debug_stack(bundled_model_path, tmp_path_factory):
    """The API and the worker logging at DEBUG: even there, no request or completion text."""
    stack = LocalStack(f"it-debug-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("debug-stack"), **FAST_HEARTBEAT)
    try:
        stack.start_api(log_level="debug")
        stack.start_worker(log_level="debug")
        stack.wait_healthy()
        yield stack
    finally:
        stack.close()


def test_flower_and_the_debug_logs_show_the_task_but_not_its_text(debug_stack):
    stack = debug_stack
    url = _start_flower(stack)
    marker = _marker()
    prompt = f"Repeat this code word: {marker}. The code word is"
    response = stack.http.post("/inference", json={"prompt": prompt, "max_tokens": 24, "temperature": 0}, headers=ASYNC)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    task = _flower_task(url, job_id)
    text = stack.http.get(f"/jobs/{job_id}").json()["result"]["text"].strip()
    assert len(text) >= 10

    assert task["worker"] and task["runtime"] > 0  # what an operator needs is there
    page = httpx.get(f"{url}/task/{job_id}", timeout=5)
    assert page.status_code == 200 and job_id in page.text
    for shown in (json.dumps(task), page.text):
        assert marker not in shown and text not in shown

    for log in ("api.log", "worker.log", "flower.log"):
        written = (stack.log_dir / log).read_text()
        assert marker not in written and text not in written, log
    assert marker in stack.job(job_id)["params"]  # the record and the response keep it
