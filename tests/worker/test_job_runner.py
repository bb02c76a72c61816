import json

import fakeredis
import pytest

from shared.config import Settings
from shared.job_record import new_job_fields
from shared.redis_keys import RedisKeys
from shared.schemas import JobKind
from worker.engine.base import InvalidGenerationInput
from worker.job_runner import JobRunner

KEYS = RedisKeys("t")


@pytest.fixture
def client():
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def settings():
    return Settings(key_prefix="t", max_job_attempts=2, _env_file=None)


def _enqueue(client, job_id="j", kind=JobKind.INFERENCE):
    client.hset(KEYS.job(job_id), mapping=new_job_fields(kind, {"prompt": "x"}))


def _run(runner: JobRunner, work, job_id="j"):
    """What the worker's tasks do with a job: run `work` in the claimed block and finish with its result."""
    with runner.claimed(job_id) as job:
        if job is None:
            return None
        result, finish_reason = work(job)
        job.finish(result, finish_reason)
        return result


def _events(client, job_id="j"):
    return [(fields["type"], json.loads(fields["data"])) for _, fields in client.xrange(KEYS.job_events(job_id))]


def test_a_finished_job_has_its_result_and_one_terminal_event(client, settings):
    _enqueue(client)

    def work(context):
        context.emit("Hel")
        context.emit("lo")
        return {"text": "Hello"}, "stop"

    assert _run(JobRunner(client, KEYS, settings, "w1"), work) == {"text": "Hello"}
    assert _events(client) == [("token", {"text": "Hel"}), ("token", {"text": "lo"}), ("done", {"text": "Hello"})]
    record = client.hgetall(KEYS.job("j"))
    assert record["status"] == "succeeded" and json.loads(record["result"]) == {"text": "Hello"}
    assert client.ttl(KEYS.job_events("j")) > 0
    assert client.smembers(KEYS.running_jobs()) == set()


def test_a_cancel_flag_is_seen_at_the_next_token(client, settings):
    _enqueue(client)

    def work(context):
        context.emit("a")
        client.set(KEYS.job_cancel("j"), "1")
        context.emit("b")
        return {"text": "ab"}, context.stop_reason()

    _run(JobRunner(client, KEYS, settings, "w1"), work)
    assert client.hget(KEYS.job("j"), "status") == "cancelled"
    assert _events(client)[-1][0] == "error"


def test_a_failing_job_records_the_error_and_reraises_for_celery(client, settings):
    _enqueue(client)

    def work(context):
        raise ValueError("boom")

    with pytest.raises(ValueError):
        _run(JobRunner(client, KEYS, settings, "w1"), work)
    assert _events(client) == [("error", {"type": "inference_error", "message": "ValueError: boom", "param": None})]


def test_input_the_model_refuses_fails_the_job_as_a_client_error_without_raising(client, settings):
    _enqueue(client)

    def work(context):
        raise InvalidGenerationInput("the prompt is 900 tokens", param="prompt")

    assert _run(JobRunner(client, KEYS, settings, "w1"), work) is None
    assert _events(client) == [
        ("error", {"type": "invalid_request_error", "message": "the prompt is 900 tokens", "param": "prompt"})
    ]
    assert client.hget(KEYS.job("j"), "status") == "failed"


def test_a_block_that_ends_without_finishing_fails_its_job(client, settings):
    _enqueue(client)
    with JobRunner(client, KEYS, settings, "w1").claimed("j") as job:
        assert job is not None
    assert client.hget(KEYS.job("j"), "status") == "failed"
    assert _events(client)[-1][1]["message"] == "the job ended without a result"


def test_a_job_already_claimed_by_a_live_worker_is_skipped(client, settings):
    _enqueue(client)
    JobRunner(client, KEYS, settings, "live").claim("j")
    client.hset(KEYS.worker_heartbeat("live"), "state", "ready")
    assert _run(JobRunner(client, KEYS, settings, "w2"), lambda c: ({"text": "twice"}, "stop")) is None
    assert client.hget(KEYS.job("j"), "worker") == "live" and _events(client) == []


def test_a_job_that_keeps_killing_workers_fails_after_max_attempts(client, settings):
    _enqueue(client)
    JobRunner(client, KEYS, settings, "dead-1").claim("j")  # its worker died mid-run (no heartbeat)
    JobRunner(client, KEYS, settings, "dead-2").claim("j")  # and again
    assert _run(JobRunner(client, KEYS, settings, "w3"), lambda c: ({"text": "x"}, "stop")) is None
    record = client.hgetall(KEYS.job("j"))
    assert record["status"] == "failed"
    assert "2 attempts" in json.loads(record["error"])["message"]
