import json
import types

import fakeredis
import pytest

from shared.config import Settings
from shared.job_record import new_job_fields
from shared.redis_keys import RedisKeys
from shared.schemas import JobKind
from worker.job_runner import JobRunner
from worker.recovery import recover_orphaned_jobs

KEYS = RedisKeys("t")


@pytest.fixture
def client():
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def settings():
    return Settings(key_prefix="t", max_job_attempts=2, _env_file=None)


def _enqueue(client, job_id="j", kind=JobKind.INFERENCE):
    client.hset(KEYS.job(job_id), mapping=new_job_fields(kind, {"prompt": "x"}))


def _events(client, job_id="j"):
    return [(fields["type"], json.loads(fields["data"])) for _, fields in client.xrange(KEYS.job_events(job_id))]


def test_a_finished_job_has_its_result_and_one_terminal_event(client, settings):
    _enqueue(client)

    def work(context):
        context.emit("Hel")
        context.emit("lo")
        return {"text": "Hello"}, "stop"

    assert JobRunner(client, KEYS, settings, "w1").run("j", work) == {"text": "Hello"}
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

    JobRunner(client, KEYS, settings, "w1").run("j", work)
    assert client.hget(KEYS.job("j"), "status") == "cancelled"
    assert _events(client)[-1][0] == "error"


def test_a_failing_job_records_the_error_and_reraises_for_celery(client, settings):
    _enqueue(client)

    def work(context):
        raise ValueError("boom")

    with pytest.raises(ValueError):
        JobRunner(client, KEYS, settings, "w1").run("j", work)
    assert _events(client) == [("error", {"type": "inference_error", "message": "ValueError: boom", "param": None})]


def test_a_job_that_keeps_killing_workers_fails_after_max_attempts(client, settings):
    _enqueue(client)
    JobRunner(client, KEYS, settings, "dead-1").claim("j")  # its worker died mid-run (no heartbeat)
    JobRunner(client, KEYS, settings, "dead-2").claim("j")  # and again
    assert JobRunner(client, KEYS, settings, "w3").run("j", lambda c: ({"text": "x"}, "stop")) is None
    record = client.hgetall(KEYS.job("j"))
    assert record["status"] == "failed"
    assert "2 attempts" in json.loads(record["error"])["message"]


def test_orphaned_jobs_are_reenqueued_exactly_once(client, settings):
    _enqueue(client, "orphan")
    _enqueue(client, "alive")
    JobRunner(client, KEYS, settings, "dead").claim("orphan")
    JobRunner(client, KEYS, settings, "live").claim("alive")
    client.hset(KEYS.worker_heartbeat("live"), "state", "ready")
    sent = []
    runtime = types.SimpleNamespace(client=client, keys=KEYS, settings=settings, worker_id="w9")

    def send_task(name, args, task_id, queue):
        sent.append((name, args[0], task_id))

    assert recover_orphaned_jobs(runtime, send_task) == ["orphan"]
    assert recover_orphaned_jobs(runtime, send_task) == []  # a second watchdog pass, or worker
    assert sent == [("moeserve.inference", "orphan", "orphan.retry1")]
    # The re-enqueued message is claimable because the recorded owner is dead.
    assert JobRunner(client, KEYS, settings, "w9").run("orphan", lambda c: ({"text": "ok"}, "stop")) == {"text": "ok"}
    assert client.hget(KEYS.job("orphan"), "attempts") == "2"
