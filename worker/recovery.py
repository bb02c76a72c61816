"""Re-enqueue jobs that lost their worker, without waiting for Celery's visibility timeout.

Celery's Redis transport returns an unacked message only after `visibility_timeout` (an hour or more,
since it must outlive the longest job). The job record knows better: a `running` job is orphaned when its
owner has no heartbeat (it died), or when the owner's heartbeat, written after the claim, names another
current job (it lived through a Redis outage but could not write the job's end). Each worker runs this
after every heartbeat; a SET NX guard makes each attempt's re-enqueue happen once across workers; the claim
script counts attempts, so a job that keeps killing its worker fails instead of looping.
"""

import logging
import time

from shared.celery_app import celery_app
from shared.job_record import ARRIVING_GRACE_S, is_orphaned
from shared.schemas import JobKind, JobStatus
from shared.task_names import TASK_FOR_KIND

log = logging.getLogger(__name__)


def _send_from_record(send_task, job_id: str, record: dict[str, str], task_id: str, queue: str) -> None:
    """The job's task, sent again: its id alone, as the API sends it (the parameters stay in the record)."""
    send_task(
        TASK_FOR_KIND[JobKind(record["kind"])],
        args=[job_id],
        task_id=task_id,
        queue=queue,
    )


def recover_orphaned_jobs(runtime, send_task=celery_app.send_task) -> list[str]:
    client, keys, settings = runtime.client, runtime.keys, runtime.settings
    recovered = []
    for job_id in client.smembers(keys.running_jobs()):
        record = client.hgetall(keys.job(job_id))
        if record.get("status") != JobStatus.RUNNING.value:
            client.srem(keys.running_jobs(), job_id)
            continue
        owner = record.get("worker", "")
        heartbeat = client.hgetall(keys.worker_heartbeat(owner)) if owner else {}
        if not is_orphaned(job_id, record, heartbeat):
            continue
        attempts = int(record.get("attempts", 0))
        if not client.set(keys.job_recovery_lock(job_id, attempts), runtime.worker_id, nx=True, ex=settings.job_ttl_s):
            continue
        _send_from_record(send_task, job_id, record, f"{job_id}.retry{attempts}", settings.queue_name)
        why = "is alive but no longer on it" if heartbeat else "died"
        log.warning("re-enqueued job %s: its worker %s %s (attempt %d)", job_id, owner, why, attempts)
        recovered.append(job_id)
    return recovered


def send_jobs_left_unsent(runtime, send_task=celery_app.send_task) -> list[str]:
    """Jobs an API process admitted (their record written) but died before putting in the queue: still
    `queued` and admitted more than ARRIVING_GRACE_S ago. Removing one from the admitted set decides which
    worker sends it; a slow API that sends it too makes a duplicate message, which the claim skips."""
    client, keys, settings = runtime.client, runtime.keys, runtime.settings
    sent = []
    for job_id in client.zrangebyscore(keys.arriving_jobs(), "-inf", time.time() - ARRIVING_GRACE_S):
        if not client.zrem(keys.arriving_jobs(), job_id):
            continue  # another worker's
        record = client.hgetall(keys.job(job_id))
        if record.get("status") != JobStatus.QUEUED.value:
            continue  # cancelled or expired meanwhile
        _send_from_record(send_task, job_id, record, job_id, settings.queue_name)
        log.warning("sent job %s: the API process that admitted it stopped before sending it", job_id)
        sent.append(job_id)
    return sent
