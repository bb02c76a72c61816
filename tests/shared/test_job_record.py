import fakeredis

from shared.job_record import CANCEL_QUEUED_SCRIPT, CLAIM_SCRIPT, new_job_fields, parse_job
from shared.redis_keys import RedisKeys
from shared.schemas import JobKind, JobStatus

KEYS = RedisKeys("t")


def _store():
    client = fakeredis.FakeRedis(decode_responses=True)
    client.hset(KEYS.job("j"), mapping=new_job_fields(JobKind.INFERENCE, {"prompt": "x"}))
    return client, client.register_script(CLAIM_SCRIPT), client.register_script(CANCEL_QUEUED_SCRIPT)


def _claim(claim, worker="w1", dead_owner="0", max_attempts=2):
    return claim(keys=[KEYS.job("j")], args=[worker, "1.0", max_attempts, dead_owner])


def _cancel(cancel):
    return cancel(keys=[KEYS.job("j"), KEYS.job_events("j")], args=["2.0", '{"type":"cancelled_error"}', 60])


def test_a_queued_job_is_claimed_once():
    client, claim, _ = _store()
    assert _claim(claim) == 1
    assert _claim(claim, worker="w2") == 0  # a duplicate delivery while the owner lives
    job = parse_job("j", client.hgetall(KEYS.job("j")))
    assert job.status is JobStatus.RUNNING and job.worker == "w1" and job.attempts == 1


def test_cancel_and_claim_exclude_each_other():
    client, claim, cancel = _store()
    assert _cancel(cancel) == 1
    assert _claim(claim) == 0
    assert client.xlen(KEYS.job_events("j")) == 1  # waiters were woken by the terminal event

    client, claim, cancel = _store()
    assert _claim(claim) == 1
    assert _cancel(cancel) == 0  # running: the worker sees the cancel flag instead


def test_a_job_whose_owner_died_is_retried_until_attempts_run_out():
    _, claim, _ = _store()
    assert _claim(claim, "w1") == 1
    assert _claim(claim, "w2", dead_owner="1") == 1
    assert _claim(claim, "w3", dead_owner="1") == -1
