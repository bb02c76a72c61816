import json
import threading
import time
import types

import fakeredis
import pytest

from shared.config import Settings
from shared.job_record import new_job_fields
from shared.redis_keys import RedisKeys
from shared.schemas import JobKind
from worker import job_runner
from worker.engine.base import InvalidGenerationInput
from worker.heartbeat import Heartbeat
from worker.job_runner import Claim, JobRunner
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


def test_an_unstreamed_job_asks_for_a_cancel_once_per_interval_not_per_token(client, settings, monkeypatch):
    _enqueue(client)
    asked = []
    real_exists = client.exists
    monkeypatch.setattr(client, "exists", lambda *keys: asked.append(keys) or real_exists(*keys))
    with JobRunner(client, KEYS, settings, "w1").claimed("j", stream_tokens=False) as job:
        client.set(KEYS.job_cancel("j"), "1")
        assert [job.stop_reason() for _ in range(5)] == [None] * 5 and asked == []  # the claim looked just now
        monkeypatch.setattr(job_runner, "CANCEL_CHECK_INTERVAL_S", 0.0)
        assert job.stop_reason() == "cancelled" and len(asked) == 1
        job.finish({"text": ""}, "cancelled")
    assert client.hget(KEYS.job("j"), "status") == "cancelled"


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


# ---------------------------------------------------------------- Redis unreachable mid-job


@pytest.fixture
def server():
    return fakeredis.FakeServer()


@pytest.fixture
def outage_client(server):
    return fakeredis.FakeRedis(server=server, decode_responses=True)


def _reconnect_after(server, seconds: float) -> threading.Thread:
    thread = threading.Timer(seconds, lambda: setattr(server, "connected", True))
    thread.start()
    return thread


def test_tokens_made_while_redis_is_down_are_sent_in_order_once_it_answers(
    outage_client, server, settings, monkeypatch
):
    monkeypatch.setattr(job_runner, "REDIS_RETRY_INTERVAL_S", 0.0)
    _enqueue(outage_client)

    def work(context):
        context.emit("a")
        server.connected = False
        context.emit("b")
        assert context.stop_reason() is None  # a cancel check that cannot reach Redis does not stop the job
        context.emit("c")
        server.connected = True
        context.emit("d")
        return {"text": "abcd"}, "stop"

    assert _run(JobRunner(outage_client, KEYS, settings, "w1"), work) == {"text": "abcd"}
    assert _events(outage_client) == [("token", {"text": t}) for t in "abcd"] + [("done", {"text": "abcd"})]


def test_an_end_that_redis_cannot_take_is_retried_until_it_answers(outage_client, server, settings):
    _enqueue(outage_client)

    def work(context):
        context.emit("a")
        server.connected = False
        context.emit("b")  # held back
        _reconnect_after(server, 0.5)
        return {"text": "ab"}, "stop"

    started = time.monotonic()
    _run(JobRunner(outage_client, KEYS, settings, "w1"), work)
    assert time.monotonic() - started >= 0.5
    assert outage_client.hget(KEYS.job("j"), "status") == "succeeded"
    assert _events(outage_client) == [("token", {"text": "a"}), ("token", {"text": "b"}), ("done", {"text": "ab"})]


def test_a_claim_cut_by_an_outage_is_retried_and_counts_one_attempt(outage_client, server, settings):
    _enqueue(outage_client)
    server.connected = False
    _reconnect_after(server, 0.4)
    assert JobRunner(outage_client, KEYS, settings, "w1").claim("j") is Claim.CLAIMED
    assert outage_client.hget(KEYS.job("j"), "attempts") == "1"


def test_past_the_retry_bound_the_job_is_given_up_and_the_watchdog_requeues_it(outage_client, server):
    settings = Settings(key_prefix="t", redis_retry_s=0.5, _env_file=None)
    _enqueue(outage_client)
    beat = Heartbeat(outage_client, KEYS, settings, "w1", "m")
    runner = JobRunner(outage_client, KEYS, settings, "w1")

    def work(context):
        server.connected = False
        return {"text": "lost"}, "stop"

    beat.current_job = "j"
    assert _run(runner, work) == {"text": "lost"}  # returned after the bound, without an end written
    beat.current_job = ""
    server.connected = True
    assert outage_client.hget(KEYS.job("j"), "status") == "running"
    beat.beat()  # the live owner's next heartbeat says it is no longer on the job
    sent = []
    runtime = types.SimpleNamespace(client=outage_client, keys=KEYS, settings=settings, worker_id="w1")
    assert recover_orphaned_jobs(runtime, lambda name, args, task_id, queue: sent.append(task_id)) == ["j"]
    assert sent == ["j.retry1"]
    assert _run(runner, lambda context: ({"text": "second"}, "stop")) == {"text": "second"}
    assert _events(outage_client) == [("done", {"text": "second"})]


def test_a_worker_whose_job_was_taken_over_writes_nothing_more(outage_client, server, settings, monkeypatch):
    monkeypatch.setattr(job_runner, "REDIS_RETRY_INTERVAL_S", 0.0)
    _enqueue(outage_client)

    def work(context):
        server.connected = False
        context.emit("stale")
        server.connected = True
        outage_client.hset(KEYS.job("j"), "worker", "w2")  # re-queued and claimed elsewhere meanwhile
        context.emit("more")
        assert context.lost and context.stop_reason() == "cancelled"
        return {"text": "stale"}, "stop"

    _run(JobRunner(outage_client, KEYS, settings, "w1"), work)
    assert outage_client.hget(KEYS.job("j"), "status") == "running" and _events(outage_client) == []


@pytest.mark.parametrize("log_requests", [False, True])
def test_a_jobs_request_reaches_the_log_only_when_log_requests_asks(client, settings, caplog, log_requests):
    client.hset(KEYS.job("j"), mapping=new_job_fields(JobKind.INFERENCE, {"prompt": "a secret recipe"}))
    runner = JobRunner(client, KEYS, settings.model_copy(update={"log_requests": log_requests}), "w1")
    with caplog.at_level("DEBUG"):
        assert _run(runner, lambda job: ({"text": "the secret answer"}, "stop")) == {"text": "the secret answer"}
    assert ("a secret recipe" in caplog.text) is log_requests
    assert "the secret answer" not in caplog.text  # the completion: never
