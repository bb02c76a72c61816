"""Re-enqueue jobs whose worker died mid-run, without waiting for Celery's visibility timeout.

Celery's Redis transport returns an unacked message only after `visibility_timeout` (an hour or more,
since it must outlive the longest job). The job record knows better: a `running` job whose owner has no
heartbeat is orphaned. A starting worker re-enqueues each such job once per attempt (a SET NX guard makes
that exactly once across workers); the claim script counts attempts, so a job that keeps killing its
worker fails instead of looping.
"""

import json
import logging

from shared.celery_app import celery_app
from shared.schemas import JobKind, JobStatus
from shared.task_names import TASK_FOR_KIND

log = logging.getLogger(__name__)


def recover_orphaned_jobs(runtime, send_task=celery_app.send_task) -> list[str]:
    client, keys, settings = runtime.client, runtime.keys, runtime.settings
    recovered = []
    for job_id in client.smembers(keys.running_jobs()):
        record = client.hgetall(keys.job(job_id))
        if record.get("status") != JobStatus.RUNNING.value:
            client.srem(keys.running_jobs(), job_id)
            continue
        owner = record.get("worker", "")
        if owner and client.exists(keys.worker_heartbeat(owner)):
            continue
        attempts = int(record.get("attempts", 0))
        if not client.set(keys.job_recovery_lock(job_id, attempts), runtime.worker_id, nx=True, ex=settings.job_ttl_s):
            continue
        kind = JobKind(record["kind"])
        send_task(
            TASK_FOR_KIND[kind],
            args=[job_id, json.loads(record["params"])],
            task_id=f"{job_id}.retry{attempts}",
            queue=settings.queue_name,
        )
        log.warning("re-enqueued job %s: its worker %s died during attempt %d", job_id, owner, attempts)
        recovered.append(job_id)
    return recovered
