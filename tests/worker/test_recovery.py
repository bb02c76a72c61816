import time
import types

import fakeredis

from shared.config import Settings
from shared.job_record import new_job_fields
from shared.redis_keys import RedisKeys
from shared.schemas import JobKind
from worker.heartbeat import Heartbeat
from worker.job_runner import Claim, JobRunner
from worker.recovery import recover_orphaned_jobs, send_jobs_left_unsent

KEYS = RedisKeys("t")


def test_orphaned_jobs_are_reenqueued_exactly_once():
    client = fakeredis.FakeRedis(decode_responses=True)
    settings = Settings(key_prefix="t", max_job_attempts=2, _env_file=None)
    for job_id in ("orphan", "alive"):
        client.hset(KEYS.job(job_id), mapping=new_job_fields(JobKind.INFERENCE, {"prompt": "x"}))
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
    with JobRunner(client, KEYS, settings, "w9").claimed("orphan") as job:
        assert job is not None
        job.finish({"text": "ok"}, "stop")
    assert client.hget(KEYS.job("orphan"), "attempts") == "2"


def test_a_job_whose_live_owner_moved_on_is_reenqueued_and_again_if_a_retry_found_it_busy():
    client = fakeredis.FakeRedis(decode_responses=True)
    settings = Settings(key_prefix="t", max_job_attempts=3, _env_file=None)
    client.hset(KEYS.job("j"), mapping=new_job_fields(JobKind.INFERENCE, {"prompt": "x"}))
    owner = Heartbeat(client, KEYS, settings, "w1", "m")
    owner.current_job = "j"
    JobRunner(client, KEYS, settings, "w1").claim("j")
    owner.beat()
    sent = []
    runtime = types.SimpleNamespace(client=client, keys=KEYS, settings=settings, worker_id="w2")

    def send_task(name, args, task_id, queue):
        sent.append(task_id)

    assert recover_orphaned_jobs(runtime, send_task) == []  # alive and on it
    owner.current_job = ""  # e.g. it could not write the job's end while Redis was down
    owner.beat()
    assert recover_orphaned_jobs(runtime, send_task) == ["j"]
    # Before the retry is claimed the owner shows the job again (say it reported a stale beat): the
    # claim refuses and frees the attempt's lock ...
    owner.current_job = "j"
    owner.beat()
    assert JobRunner(client, KEYS, settings, "w2").claim("j") is Claim.NOT_CLAIMABLE
    # ... so that when the owner does give it up, it is re-queued again rather than left running.
    owner.current_job = ""
    owner.beat()
    assert recover_orphaned_jobs(runtime, send_task) == ["j"]
    assert sent == ["j.retry1", "j.retry1"]


def test_jobs_an_api_admitted_but_never_sent_are_sent_once_after_the_grace():
    client = fakeredis.FakeRedis(decode_responses=True)
    settings = Settings(key_prefix="t", _env_file=None)
    admitted_at = {"stranded": time.time() - 60, "cancelled": time.time() - 60, "in-flight": time.time()}
    for job_id, at in admitted_at.items():
        client.hset(KEYS.job(job_id), mapping=new_job_fields(JobKind.INFERENCE, {"prompt": job_id}))
        client.zadd(KEYS.arriving_jobs(), {job_id: at})
    client.hset(KEYS.job("cancelled"), "status", "cancelled")
    sent = []
    runtime = types.SimpleNamespace(client=client, keys=KEYS, settings=settings, worker_id="w1")

    def send_task(name, args, task_id, queue):
        sent.append((name, args, task_id, queue))

    assert send_jobs_left_unsent(runtime, send_task) == ["stranded"]
    assert send_jobs_left_unsent(runtime, send_task) == []  # a second pass, or another worker
    assert sent == [("moeserve.inference", ["stranded"], "stranded", settings.queue_name)]
    assert client.zrange(KEYS.arriving_jobs(), 0, -1) == ["in-flight"]  # still within its API's grace
