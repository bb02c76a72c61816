import types

import fakeredis

from shared.config import Settings
from shared.job_record import new_job_fields
from shared.redis_keys import RedisKeys
from shared.schemas import JobKind
from worker.job_runner import JobRunner
from worker.recovery import recover_orphaned_jobs

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
