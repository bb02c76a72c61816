"""Real faults on real processes: a worker SIGKILLed under the supervisor, Redis killed and restarted
mid-job, two workers sharing a queue with one killed mid-job, a job its API admitted but never sent, a
worker started before its Redis (or with none), and a worker whose model does not load beside a healthy one.

Each test logs what it measured (pytest -o log_cli=true shows it)."""

import logging
import os
import signal
import time
import uuid

import pytest

from benchmarks.local_stack import LocalStack, RedisServer
from shared.job_record import ADMIT_SCRIPT, ARRIVING_GRACE_S, new_job_fields
from shared.redis_keys import RedisKeys
from shared.schemas import GenerationParams, JobKind
from tests.integration.conftest import FAST_HEARTBEAT

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

LONG_JOB = {"prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 60, "temperature": 0}
TERMINAL = {"succeeded", "failed", "cancelled"}


def _submit(stack: LocalStack, body: dict) -> str:
    """An async job whose tokens go out as events (`stream`): they show when it is mid-generation."""
    response = stack.http.post("/inference", json=body | {"stream": True}, headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _wait(what: str, condition, timeout_s: float = 120, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def _running_with_tokens(stack: LocalStack, job_id: str) -> dict[str, str]:
    """The job's record once it runs and has streamed a token."""
    return _wait(
        f"job {job_id} to stream",
        lambda: stack.job(job_id).get("status") == "running" and stack.token_events(job_id) > 0 and stack.job(job_id),
    )


def _ended(stack: LocalStack, job_id: str, timeout_s: float = 120) -> dict[str, str]:
    return _wait(
        f"job {job_id} to end", lambda: stack.job(job_id).get("status") in TERMINAL and stack.job(job_id), timeout_s
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_worker_killed_under_the_supervisor_is_restarted_and_its_job_completes_once(bundled_model_path, tmp_path):
    stack = LocalStack(f"it-sup-{uuid.uuid4().hex[:8]}", tmp_path, **FAST_HEARTBEAT)
    supervised = stack.start_supervised(workers=1)
    try:
        stack.wait_healthy()
        job_id = _submit(stack, LONG_JOB)
        owner = _running_with_tokens(stack, job_id)["worker"]
        (first,) = stack.workers()
        assert first["worker_id"] == owner

        os.kill(int(first["pid"]), signal.SIGKILL)
        killed_at = time.monotonic()
        answers = []

        def restarted_worker_ready():
            answers.append(stack.http.get("/metrics").status_code)  # the API keeps answering meanwhile
            return [w for w in stack.workers() if w["worker_id"] != owner and w["state"] == "ready"]

        (second,) = _wait("the restarted worker", restarted_worker_ready, every_s=0.25)
        ready_s = time.monotonic() - killed_at
        job = _ended(stack, job_id)
        ended_s = time.monotonic() - killed_at
        logger.warning(
            f"supervisor: restarted worker ready {ready_s:.1f} s after SIGKILL; job ended after {ended_s:.1f} s"
        )

        assert set(answers) == {200}
        assert job["status"] == "succeeded" and job["attempts"] == "2" and job["worker"] == second["worker_id"]
        assert stack.terminal_events(job_id) == 1
        log = (tmp_path / "supervised.log").read_text()
        assert "exited: worker0 (terminated by SIGKILL; not expected)" in log
        assert log.count("spawned: 'worker0'") == 2
        survivors = [int(second["pid"]), supervised.pid]
    finally:
        stack.close()  # Ctrl-C to the supervisor's session
    assert supervised.returncode is not None
    assert not [pid for pid in survivors if _alive(pid)], "Ctrl-C left processes running"


def test_redis_killed_and_restarted_mid_job_leaves_no_job_running(bundled_model_path, tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    stack = LocalStack(f"it-redis-{uuid.uuid4().hex[:8]}", tmp_path, REDIS_URL=server.url, **FAST_HEARTBEAT)
    try:
        stack.start_api()
        stack.start_worker()
        stack.wait_healthy()
        # Long enough to outlast the first token, short enough to end while Redis is down (most often: its
        # end is then written once Redis is back; else its held-back tokens are, then its end).
        running = _submit(stack, dict(LONG_JOB, max_tokens=16))
        waiting = [_submit(stack, {"prompt": f"Count to {n}.", "max_tokens": 8}) for n in (3, 4, 5)]
        time.sleep(1.2)  # past the append-only file's one-second fsync: the accepted jobs are on disk
        _running_with_tokens(stack, running)
        server.kill()
        assert stack.http.post("/inference", json={"prompt": "x"}).status_code == 503
        time.sleep(6)  # longer than HEARTBEAT_STALE_S: the worker's heartbeat has expired when Redis returns
        server.start()
        back_at = time.monotonic()
        ended = {running: _ended(stack, running)}
        running_s = time.monotonic() - back_at
        ended |= {job_id: _ended(stack, job_id) for job_id in waiting}
        end_retried = "writing its end: done once Redis answered again" in (tmp_path / "worker.log").read_text()
        logger.warning(
            f"redis outage: the interrupted job ended {running_s:.1f} s after Redis returned "
            f"(attempts {ended[running]['attempts']}, end written by a retry: {end_retried}); "
            f"all four within {time.monotonic() - back_at:.1f} s"
        )

        assert {job["status"] for job in ended.values()} == {"succeeded"}
        assert all(stack.terminal_events(job_id) == 1 for job_id in ended)
        assert stack.redis.smembers(f"{stack.prefix}:jobs:running") == set()
        assert stack.http.post("/inference", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200
    finally:
        stack.close()
        server.kill()


def test_two_workers_share_the_queue_and_the_survivor_finishes_a_killed_workers_job(bundled_model_path, tmp_path):
    stack = LocalStack(f"it-two-{uuid.uuid4().hex[:8]}", tmp_path, **FAST_HEARTBEAT)
    try:
        stack.start_api()
        stack.start_worker("worker-a")
        stack.start_worker("worker-b")
        _wait("two ready workers", lambda: sum(w["state"] == "ready" for w in stack.workers()) == 2, 180, 0.25)
        for body in (stack.http.get("/health").json(), stack.http.get("/metrics").json()):
            assert len(body["workers"]) == 2 and {w["state"] for w in body["workers"]} == {"ready"}

        job_id = _submit(stack, LONG_JOB)
        owner = _running_with_tokens(stack, job_id)["worker"]
        by_id = {w["worker_id"]: w for w in stack.workers()}
        (survivor,) = set(by_id) - {owner}
        expected = {owner: job_id, survivor: None}  # as the next heartbeats publish it

        def current_jobs() -> bool:
            return {w["id"]: w["current_job"] for w in stack.http.get("/health").json()["workers"]} == expected

        _wait("/health to show which worker runs the job", current_jobs, 10)

        os.kill(int(by_id[owner]["pid"]), signal.SIGKILL)
        killed_at = time.monotonic()
        job = _ended(stack, job_id)
        logger.warning(
            f"scale-out: the survivor finished the killed worker's job {time.monotonic() - killed_at:.1f} s "
            "after the kill"
        )

        assert job["status"] == "succeeded" and job["worker"] == survivor and job["attempts"] == "2"
        assert stack.terminal_events(job_id) == 1
        assert [w["worker_id"] for w in stack.workers()] == [survivor]
    finally:
        stack.close()


def test_a_job_admitted_by_an_api_that_died_before_sending_it_is_sent_by_a_worker(stack):
    """The API's first step, done here as it does it (the admission script writes the record and counts the job
    as arriving), dated back past the grace; then nothing, as from an API process killed before `send_task`."""
    keys = RedisKeys(stack.prefix)
    job_id = f"stranded-{uuid.uuid4().hex[:8]}"
    params = GenerationParams(prompt="Hi", max_tokens=2, temperature=0.0)
    fields = new_job_fields(JobKind.INFERENCE, params.model_dump())
    admitted, _ = stack.redis.register_script(ADMIT_SCRIPT)(
        keys=[keys.celery_queue(stack.prefix), keys.arriving_jobs(), keys.job(job_id)],
        args=[64, repr(time.time() - ARRIVING_GRACE_S - 1), job_id, 600, *(x for pair in fields.items() for x in pair)],
    )
    assert admitted == 1
    record = _ended(stack, job_id, timeout_s=60)  # the worker's next heartbeat sends it
    assert record["status"] == "succeeded" and record["attempts"] == "1"
    assert stack.terminal_events(job_id) == 1 and stack.redis.zscore(keys.arriving_jobs(), job_id) is None


def test_a_worker_started_before_its_redis_waits_for_it_then_serves(bundled_model_path, tmp_path):
    server = RedisServer(tmp_path / "redis")  # not started yet
    stack = LocalStack(f"it-late-{uuid.uuid4().hex[:8]}", tmp_path, REDIS_URL=server.url, **FAST_HEARTBEAT)
    try:
        stack.start_api()
        worker = stack.start_worker()
        log = tmp_path / "worker.log"
        _wait(
            "the worker to find Redis unreachable", lambda: "first heartbeat: Redis is unreachable" in log.read_text()
        )
        server.start()
        stack.wait_healthy()
        response = stack.http.post("/inference", json={"prompt": "Hi", "max_tokens": 3})
        assert response.status_code == 200 and response.json()["tokens_generated"] > 0
        assert worker.poll() is None
    finally:
        if server.process is None:
            server.start()  # for close() to clean up
        stack.close()
        server.kill()


def test_a_worker_whose_redis_never_answers_exits_for_its_supervisor_to_restart(tmp_path):
    unreachable = RedisServer(tmp_path / "redis")  # never started: nothing listens on its port
    stack = LocalStack(f"it-nored-{uuid.uuid4().hex[:8]}", tmp_path, REDIS_URL=unreachable.url, REDIS_RETRY_S="2")
    worker = stack.start_worker()
    try:
        assert worker.wait(timeout=60) == 1
    finally:
        if worker.poll() is None:  # no Redis to clean: close() would fail
            stack.stop(worker)
    assert "Redis never answered within REDIS_RETRY_S; the worker exits" in (tmp_path / "worker.log").read_text()


def test_a_worker_whose_model_fails_to_load_takes_no_jobs_from_a_healthy_one(bundled_model_path, tmp_path):
    stack = LocalStack(f"it-broken-{uuid.uuid4().hex[:8]}", tmp_path, **FAST_HEARTBEAT)
    try:
        stack.start_api()
        stack.start_worker("broken", MODEL_ID=str(tmp_path / "no-such-model"))
        (broken,) = _wait(
            "the broken worker's heartbeat", lambda: [w for w in stack.workers() if w["state"] == "failed"]
        )
        refused = stack.http.post("/inference", json={"prompt": "Hi"})
        assert refused.status_code == 503 and "could not load the model" in refused.json()["error"]["message"]

        stack.start_worker("healthy")
        stack.wait_healthy()
        jobs = [_submit(stack, {"prompt": f"Count to {n}.", "max_tokens": 4}) for n in range(4)]
        ended = [_ended(stack, job_id) for job_id in jobs]

        assert {job["status"] for job in ended} == {"succeeded"}
        assert broken["worker_id"] not in {job["worker"] for job in ended}
        assert "this worker takes no jobs" in (tmp_path / "broken.log").read_text()
    finally:
        stack.close()
