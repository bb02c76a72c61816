"""The job record's Lua scripts, which carry the job state's correctness, on fakeredis's Lua emulation and on the
real Redis server that `make test` starts (skipped where none answers)."""

import uuid

import fakeredis
import pytest
import redis

from shared.config import get_settings
from shared.histograms import JOB_DURATION, QUEUE_WAIT, TIME_TO_FIRST_TOKEN
from shared.job_record import CANCEL_QUEUED_SCRIPT, CLAIM_SCRIPT, FINISH_SCRIPT, is_orphaned, new_job_fields, parse_job
from shared.redis_keys import RedisKeys
from shared.schemas import GenerationOutcome, JobKind, JobStatus
from worker.metrics import inference_figures

KEYS = RedisKeys(f"test-job-record-{uuid.uuid4().hex[:8]}")  # apart from whatever else the real server holds


@pytest.fixture(params=["fakeredis", "redis"])
def server(request):
    """An empty store of this test's keys: fakeredis, or the real server at REDIS_URL."""
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis(decode_responses=True)
        return
    client = redis.Redis.from_url(get_settings().redis_url, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis answers at REDIS_URL (make test starts one)")
    yield client
    for key in client.scan_iter(KEYS.every_key_pattern()):
        client.delete(key)
    client.close()


def _store(client):
    for key in client.scan_iter(KEYS.every_key_pattern()):
        client.delete(key)
    client.hset(KEYS.job("j"), mapping=new_job_fields(JobKind.INFERENCE, {"prompt": "x"}))
    return client, client.register_script(CLAIM_SCRIPT), client.register_script(CANCEL_QUEUED_SCRIPT)


def _claim(claim, worker="w1", max_attempts=2, now="1.0"):
    return claim(
        keys=[KEYS.job("j"), KEYS.running_jobs(), KEYS.job_cancel("j")],
        args=[worker, now, max_attempts, KEYS.worker_heartbeat_prefix(), "j", KEYS.job_recovery_lock_prefix("j")],
    )


def _cancel(cancel):
    return cancel(
        keys=[KEYS.job("j"), KEYS.job_events("j"), KEYS.metrics()],
        args=["2.0", '{"type":"cancelled_error"}', 60, "jobs_cancelled"],
    )


def test_a_queued_job_is_claimed_once(server):
    client, claim, _ = _store(server)
    assert _claim(claim) == 1
    client.hset(KEYS.worker_heartbeat("w1"), "state", "ready")
    assert _claim(claim, worker="w2") == 0  # a duplicate delivery while the owner lives
    assert client.smembers(KEYS.running_jobs()) == {"j"}
    job = parse_job("j", client.hgetall(KEYS.job("j")))
    assert job.status is JobStatus.RUNNING and job.worker == "w1" and job.attempts == 1


def test_cancel_and_claim_exclude_each_other(server):
    client, claim, cancel = _store(server)
    assert _cancel(cancel) == 1
    assert _claim(claim) == 0
    assert client.xlen(KEYS.job_events("j")) == 1  # waiters were woken by the terminal event
    assert client.hget(KEYS.metrics(), "jobs_cancelled") == "1"  # counted once, where it ended

    client, claim, cancel = _store(server)
    assert _claim(claim) == 1
    assert _cancel(cancel) == 0  # running: the worker sees the cancel flag instead
    assert client.hget(KEYS.metrics(), "jobs_cancelled") is None


def test_a_job_whose_owner_died_is_retried_until_attempts_run_out(server):
    _, claim, _ = _store(server)
    assert _claim(claim, "w1") == 1  # none of these workers has a heartbeat: each died
    assert _claim(claim, "w2") == 1
    assert _claim(claim, "w3") == -1


def test_a_claim_reports_a_cancel_that_arrived_first(server):
    client, claim, _ = _store(server)
    client.set(KEYS.job_cancel("j"), "1")
    assert _claim(claim) == 2


def _owner_beat(client, last_heartbeat: str, current_job: str, worker="w1"):
    client.hset(
        KEYS.worker_heartbeat(worker),
        mapping={"state": "ready", "last_heartbeat": last_heartbeat, "current_job": current_job},
    )


@pytest.mark.parametrize(
    ("beat", "orphaned"),
    [
        (None, True),  # the owner died: its heartbeat expired
        (("5.0", "other"), True),  # alive, and a beat after the claim shows it on another job
        (("5.0", ""), True),  # alive and idle after the claim: it gave the job up
        (("5.0", "j"), False),  # alive and on this job
        (("0.5", ""), False),  # its last beat predates the claim (claimed at 1.0): no news yet
    ],
)
def test_a_running_job_is_taken_over_exactly_when_the_watchdog_calls_it_orphaned(server, beat, orphaned):
    client, claim, _ = _store(server)
    assert _claim(claim, "w1") == 1
    if beat is not None:
        _owner_beat(client, *beat)
    record = client.hgetall(KEYS.job("j"))
    assert is_orphaned("j", record, client.hgetall(KEYS.worker_heartbeat("w1"))) is orphaned
    assert _claim(claim, "w2") == (1 if orphaned else 0)
    assert client.hget(KEYS.job("j"), "worker") == ("w2" if orphaned else "w1")


def test_a_claim_that_finds_the_owner_alive_frees_the_attempts_recovery_lock(server):
    client, claim, _ = _store(server)
    assert _claim(claim, "w1") == 1
    _owner_beat(client, "5.0", "j")
    client.set(KEYS.job_recovery_lock("j", 1), "w2")
    assert _claim(claim, "w2") == 0
    assert not client.exists(KEYS.job_recovery_lock("j", 1))


def test_a_claim_sent_again_after_a_lost_reply_answers_the_same_without_another_attempt(server):
    client, claim, _ = _store(server)
    _owner_beat(client, "5.0", "j")  # the claimer's own beat names the job it is claiming
    assert _claim(claim, "w1") == 1
    assert _claim(claim, "w1") == 1
    assert client.hget(KEYS.job("j"), "attempts") == "1"


def test_a_worker_reclaims_its_own_earlier_attempt(server):
    client, claim, _ = _store(server)
    assert _claim(claim, "w1") == 1
    _owner_beat(client, "5.0", "j")  # set before the claim, as the worker does
    later = claim(
        keys=[KEYS.job("j"), KEYS.running_jobs(), KEYS.job_cancel("j")],
        args=["w1", "9.0", 2, KEYS.worker_heartbeat_prefix(), "j", KEYS.job_recovery_lock_prefix("j")],
    )
    assert later == 1 and client.hget(KEYS.job("j"), "attempts") == "2"


def _finish(client, owner: str, figures: str = "", now: float = 50.0) -> int:
    return client.register_script(FINISH_SCRIPT)(
        keys=[
            KEYS.job("j"),
            KEYS.job_events("j"),
            KEYS.running_jobs(),
            KEYS.job_cancel("j"),
            KEYS.metrics(),
            KEYS.recent_tokens_per_second(),
            *(KEYS.histogram(spec.name) for spec in (QUEUE_WAIT, JOB_DURATION, TIME_TO_FIRST_TOKEN)),
        ],
        args=[owner, 60, "done", '{"text": "x"}', "j", repr(now), figures, "status", "succeeded", "result", '{"x": 1}'],
    )


def test_an_inference_is_counted_with_its_end_and_its_times_read_from_the_record(server):
    client, claim, _ = _store(server)
    client.hset(KEYS.job("j"), "created_at", "100.0")
    assert _claim(claim, "w1", now="100.2") == 1  # 0.2 s in the queue
    client.lpush(KEYS.recent_tokens_per_second(), "4.0")  # an earlier job's speed
    outcome = GenerationOutcome(
        text="x",
        tokens_generated=8,
        prompt_tokens=2,
        generation_time=0.5,
        tokens_per_second=16.0,
        memory_used_gb=0.1,
        finish_reason="length",
    )
    figures = inference_figures(outcome, first_token_at=100.6)  # first text 0.6 s after submission
    assert _finish(client, "w1", figures, now=101.0) == 1  # 0.8 s running
    metrics = client.hgetall(KEYS.metrics())
    assert metrics["total_inferences"] == "1" and metrics["total_tokens"] == "8" and metrics["jobs_succeeded"] == "1"
    assert float(metrics["total_generation_time"]) == 0.5 and float(metrics["avg_tokens_per_second"]) == 10.0
    record = client.hgetall(KEYS.job("j"))
    assert record["finished_at"] == "101.0" and record["first_token_at"] == "100.6"
    assert float(metrics["last_inference_at"]) == 101.0
    for spec, bucket, seconds in (
        (QUEUE_WAIT, "0.25", 0.2),
        (JOB_DURATION, "1.0", 0.8),
        (TIME_TO_FIRST_TOKEN, "1.0", 0.6),
    ):
        histogram = client.hgetall(KEYS.histogram(spec.name))
        assert histogram[bucket] == "1" and histogram["count"] == "1", spec.name
        assert float(histogram["sum"]) == pytest.approx(seconds), spec.name
        assert len(histogram) == 3, spec.name  # one bucket, sum, count
    assert _finish(client, "w1", figures) == 0 and client.hget(KEYS.metrics(), "total_inferences") == "1"


def test_the_end_is_written_once_and_only_by_the_owner(server):
    client, claim, _ = _store(server)
    assert _finish(client, "w1") == 0  # still queued: nobody's to end
    assert _claim(claim, "w1") == 1
    assert _finish(client, "w2") == 0  # not the owner
    assert _finish(client, "w1") == 1
    assert _finish(client, "w1") == 0  # already ended
    assert client.hget(KEYS.job("j"), "status") == "succeeded" and client.xlen(KEYS.job_events("j")) == 1
    assert client.smembers(KEYS.running_jobs()) == set() and client.ttl(KEYS.job("j")) > 0
    assert client.hget(KEYS.metrics(), "jobs_succeeded") == "1"  # counted once, by the end that was written
    client.delete(KEYS.job("j"))
    assert _finish(client, "") == 0  # expired (or lost with Redis): no half record is created
    assert not client.exists(KEYS.job("j"))
