import fakeredis

from shared.job_record import CANCEL_QUEUED_SCRIPT, CLAIM_SCRIPT, new_job_fields, parse_job
from shared.redis_keys import RedisKeys
from shared.schemas import JobKind, JobStatus

KEYS = RedisKeys("t")


def _store():
    client = fakeredis.FakeRedis(decode_responses=True)
    client.hset(KEYS.job("j"), mapping=new_job_fields(JobKind.INFERENCE, {"prompt": "x"}))
    return client, client.register_script(CLAIM_SCRIPT), client.register_script(CANCEL_QUEUED_SCRIPT)


def _claim(claim, worker="w1", max_attempts=2):
    return claim(
        keys=[KEYS.job("j"), KEYS.running_jobs(), KEYS.job_cancel("j")],
        args=[worker, "1.0", max_attempts, KEYS.worker_heartbeat_prefix(), "j"],
    )


def _cancel(cancel):
    return cancel(
        keys=[KEYS.job("j"), KEYS.job_events("j"), KEYS.metrics()],
        args=["2.0", '{"type":"cancelled_error"}', 60, "jobs_cancelled"],
    )


def test_a_queued_job_is_claimed_once():
    client, claim, _ = _store()
    assert _claim(claim) == 1
    client.hset(KEYS.worker_heartbeat("w1"), "state", "ready")
    assert _claim(claim, worker="w2") == 0  # a duplicate delivery while the owner lives
    assert client.smembers(KEYS.running_jobs()) == {"j"}
    job = parse_job("j", client.hgetall(KEYS.job("j")))
    assert job.status is JobStatus.RUNNING and job.worker == "w1" and job.attempts == 1


def test_cancel_and_claim_exclude_each_other():
    client, claim, cancel = _store()
    assert _cancel(cancel) == 1
    assert _claim(claim) == 0
    assert client.xlen(KEYS.job_events("j")) == 1  # waiters were woken by the terminal event
    assert client.hget(KEYS.metrics(), "jobs_cancelled") == "1"  # counted once, where it ended

    client, claim, cancel = _store()
    assert _claim(claim) == 1
    assert _cancel(cancel) == 0  # running: the worker sees the cancel flag instead
    assert client.hget(KEYS.metrics(), "jobs_cancelled") is None


def test_a_job_whose_owner_died_is_retried_until_attempts_run_out():
    _, claim, _ = _store()
    assert _claim(claim, "w1") == 1  # none of these workers has a heartbeat: each died
    assert _claim(claim, "w2") == 1
    assert _claim(claim, "w3") == -1


def test_a_claim_reports_a_cancel_that_arrived_first():
    client, claim, _ = _store()
    client.set(KEYS.job_cancel("j"), "1")
    assert _claim(claim) == 2
