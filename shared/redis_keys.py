"""Every Redis key the service uses, built in one place, each with its lifetime beside it.

Celery's own keys (the broker list per queue, its result keys) are named by Celery; only the queue list
is read here, to measure the backlog.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str

    # One hash per job: status, params, owner worker, attempts, result or error. TTL: job_ttl_s.
    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    # One stream per job: token events, then exactly one terminal event (done or error). TTL: job_ttl_s.
    def job_events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    # Set while a cancel is requested; the worker checks it between tokens. TTL: job_ttl_s.
    def job_cancel(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:cancel"

    # Sorted set of the jobs admitted by the API and not yet in the Celery queue (ADMIT_SCRIPT), scored by
    # admission time. No TTL: the API removes each once sent; a worker sends those an API left behind when it
    # died (older than ARRIVING_GRACE_S, worker/recovery.py).
    def arriving_jobs(self) -> str:
        return f"{self.prefix}:jobs:admitted"

    # Set of job ids currently running, for recovering jobs whose worker died. No TTL (members pruned).
    def running_jobs(self) -> str:
        return f"{self.prefix}:jobs:running"

    # Guard so that only one process re-enqueues a given attempt of a dead job. TTL: job_ttl_s.
    # A claim that finds the job's owner alive deletes it, so that the job can be re-queued again if it is
    # orphaned later in the same attempt.
    def job_recovery_lock(self, job_id: str, attempt: int) -> str:
        return f"{self.job_recovery_lock_prefix(job_id)}{attempt}"

    def job_recovery_lock_prefix(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:recovered:"

    # One hash per worker, refreshed every heartbeat_interval_s. TTL: heartbeat_stale_s.
    def worker_heartbeat(self, worker_id: str) -> str:
        return f"{self.worker_heartbeat_prefix()}{worker_id}"

    def worker_heartbeat_prefix(self) -> str:
        return f"{self.prefix}:worker:"

    # Set of worker ids that ever announced themselves; stale members are pruned by readers. No TTL.
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    # Service-wide counters, updated once per finished job. No TTL.
    def metrics(self) -> str:
        return f"{self.prefix}:metrics"

    # One hash per latency histogram (shared/histograms.py): a count per bucket, sum, count. No TTL.
    def histogram(self, name: str) -> str:
        return f"{self.prefix}:metrics:histogram:{name}"

    # Capped list of the last N jobs' tokens/s, for the rolling average. No TTL (LTRIM caps it).
    def recent_tokens_per_second(self) -> str:
        return f"{self.prefix}:metrics:recent_tps"

    def every_key_pattern(self) -> str:
        """A SCAN/KEYS pattern that matches every key above (not Celery's)."""
        return f"{self.prefix}:*"

    @staticmethod
    def celery_queue(queue_name: str) -> str:
        """The list Celery's Redis transport keeps a queue's waiting messages in (priority 0)."""
        return queue_name


#: How many recent jobs the rolling tokens/s average covers.
RECENT_TPS_WINDOW = 100
