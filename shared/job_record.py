"""The job record (one Redis hash per job) and the atomic state changes both sides make to it.

The API writes a record as `queued`; the worker moves it to `running` and then to a terminal state; a
cancel moves a queued job straight to `cancelled`. The two transitions that race (claim and cancel) are
Lua scripts so that exactly one of them wins.
"""

import json
import time
from datetime import UTC, datetime
from typing import Any

from shared.schemas import ErrorType, JobError, JobKind, JobStatus, JobView

# KEYS[1] = job hash, KEYS[2] = running-jobs set, KEYS[3] = cancel flag.
# ARGV = worker id, now, max attempts, heartbeat key prefix (the owner's id completes it), job id.
# A job is claimable when queued, or when running under an owner whose heartbeat is gone (it died).
# Returns: 1 claimed, 2 claimed but a cancel is pending, 0 not claimable, -1 attempts exhausted.
# One script, so a claim is one round trip and cannot interleave with a cancel.
CLAIM_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
if status == 'running' then
  local owner = redis.call('HGET', KEYS[1], 'worker')
  if owner and redis.call('EXISTS', ARGV[4] .. owner) == 1 then return 0 end
elseif status ~= 'queued' then
  return 0
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[5])
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
return 1
"""

# KEYS[1] = job hash, KEYS[2] = job event stream, KEYS[3] = metrics hash. ARGV = now, error JSON, ttl, the
# metrics field that counts cancelled jobs. Returns 1 when the queued job was cancelled here, 0 when it had
# already left the queue.
CANCEL_QUEUED_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1], 'error', ARGV[2])
redis.call('XADD', KEYS[2], '*', 'type', 'error', 'data', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
return 1
"""


def jobs_finished_field(status: JobStatus) -> str:
    """The metrics hash's count of jobs that ended in `status`."""
    return f"jobs_{status.value}"


def new_job_fields(kind: JobKind, params: dict[str, Any], client: str | None = None) -> dict[str, str]:
    """`client`: a digest of the submitting API key (never the key), when the service checks keys."""
    fields = {
        "kind": kind.value,
        "status": JobStatus.QUEUED.value,
        "created_at": repr(time.time()),
        "attempts": "0",
        "params": json.dumps(params),
    }
    if client is not None:
        fields["client"] = client
    return fields


def cancelled_error() -> JobError:
    return JobError(type=ErrorType.CANCELLED, message="the job was cancelled")


def _timestamp(raw: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(raw), tz=UTC) if raw else None


def parse_job(job_id: str, fields: dict[str, str]) -> JobView:
    """A job hash as read from Redis (decoded strings) -> the view the API returns."""
    return JobView(
        id=job_id,
        kind=JobKind(fields["kind"]),
        status=JobStatus(fields["status"]),
        created_at=_timestamp(fields["created_at"]),
        started_at=_timestamp(fields.get("started_at")),
        finished_at=_timestamp(fields.get("finished_at")),
        attempts=int(fields.get("attempts", 0)),
        worker=fields.get("worker") or None,
        progress=fields.get("progress") or None,
        result=json.loads(fields["result"]) if fields.get("result") else None,
        error=JobError.model_validate_json(fields["error"]) if fields.get("error") else None,
    )
