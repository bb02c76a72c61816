"""The job record (one Redis hash per job) and the atomic state changes both sides make to it.

The API writes a record as `queued`; the worker moves it to `running` and then to a terminal state; a
cancel moves a queued job straight to `cancelled`. The transitions that race (claim, cancel, a worker's end
of a job it may have lost during a Redis outage) are Lua scripts, so that exactly one of them wins.
"""

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from shared.schemas import ErrorType, JobError, JobKind, JobStatus, JobView

# KEYS[1] = job hash, KEYS[2] = running-jobs set, KEYS[3] = cancel flag.
# ARGV = worker id, now, max attempts, heartbeat key prefix (the owner's id completes it), job id,
# recovery lock prefix (the attempt completes it).
# A job is claimable when queued, or when running but orphaned (see `is_orphaned`, which this mirrors;
# and a worker's own earlier attempt is over, since a worker runs one job at a time).
# The same claim sent again (same worker and `now`, after a reply lost to a broken connection) answers
# as the first did, without counting another attempt.
# A claim that finds the owner alive frees the attempt's recovery lock: if the job is orphaned later,
# the watchdog may re-queue it again.
# Returns: 1 claimed, 2 claimed but a cancel is pending, 0 not claimable, -1 attempts exhausted.
# One script, so a claim is one round trip and cannot interleave with a cancel.
CLAIM_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
local owner = redis.call('HGET', KEYS[1], 'worker')
local started_at = redis.call('HGET', KEYS[1], 'started_at')
local repeated = status == 'running' and owner == ARGV[1] and started_at == ARGV[2]
if status == 'running' and not repeated and owner ~= ARGV[1] then
  local beat = ARGV[4] .. (owner or '')
  local orphaned = redis.call('EXISTS', beat) == 0
  if not orphaned then
    local beat_at = tonumber(redis.call('HGET', beat, 'last_heartbeat') or '0') or 0
    orphaned = beat_at > (tonumber(started_at or '0') or 0)
      and (redis.call('HGET', beat, 'current_job') or '') ~= ARGV[5]
  end
  if not orphaned then
    redis.call('DEL', ARGV[6] .. (redis.call('HGET', KEYS[1], 'attempts') or '0'))
    return 0
  end
elseif status ~= 'queued' and status ~= 'running' then
  return 0
end
if not repeated then
  local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  if attempts > tonumber(ARGV[3]) then return -1 end
  redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[5])
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
return 1
"""

# KEYS[1] = job hash, KEYS[2] = job event stream, KEYS[3] = running-jobs set, KEYS[4] = cancel flag,
# KEYS[5] = metrics hash, KEYS[6] = recent tokens/s list, KEYS[7..9] = the queue wait, job duration and time to
# first token histograms (shared/histograms.py).
# ARGV = expected owner ('' = any), ttl, terminal event type, its data, job id, now (the end's time), the
# inference's figures as JSON ('' for none; see `worker.metrics.inference_figures`), then field/value pairs.
# The terminal state is written only over a running job still owned as expected: a worker that lost its
# job (re-queued and claimed elsewhere while Redis was out of its reach) must not end it a second time.
# The service's counters move in the same step, so that a job is counted exactly when its end is written, and
# the worker is free for its next job after one round trip.
# Returns 1 written, 0 not (finished, expired, or owned by another worker now).
FINISH_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'finished_at', ARGV[6])
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[2], '*', 'type', ARGV[3], 'data', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[5])
redis.call('DEL', KEYS[4])
redis.call('HINCRBY', KEYS[5], 'jobs_' .. redis.call('HGET', KEYS[1], 'status'), 1)  -- jobs_finished_field
if ARGV[7] == '' then return 1 end
local run = cjson.decode(ARGV[7])
redis.call('HINCRBY', KEYS[5], 'total_inferences', 1)
redis.call('HINCRBY', KEYS[5], 'total_tokens', run.tokens)
redis.call('HINCRBYFLOAT', KEYS[5], 'total_generation_time', run.generation_time)
redis.call('LPUSH', KEYS[6], run.tokens_per_second)
redis.call('LTRIM', KEYS[6], 0, run.window - 1)
local recent, sum = redis.call('LRANGE', KEYS[6], 0, -1), 0
for _, speed in ipairs(recent) do sum = sum + tonumber(speed) end
redis.call('HSET', KEYS[5], 'avg_tokens_per_second', tostring(sum / #recent), 'last_inference_at', ARGV[6])
local function observe(key, seconds)
  seconds = math.max(0, seconds)
  local field = '+Inf'
  for _, bound in ipairs(run.buckets) do
    if seconds <= tonumber(bound) then field = bound; break end
  end
  redis.call('HINCRBY', key, field, 1)
  redis.call('HINCRBYFLOAT', key, 'sum', tostring(seconds))
  redis.call('HINCRBY', key, 'count', 1)
end
local created = tonumber(redis.call('HGET', KEYS[1], 'created_at') or '')
local started = tonumber(redis.call('HGET', KEYS[1], 'started_at') or '')
local now = tonumber(ARGV[6])
if created and started then observe(KEYS[7], started - created) end
if started then observe(KEYS[8], now - started) end
if run.first_token_at then
  redis.call('HSET', KEYS[1], 'first_token_at', run.first_token_at)
  if created then observe(KEYS[9], tonumber(run.first_token_at) - created) end
end
return 1
"""

# KEYS[1] = job hash, KEYS[2] = job event stream, KEYS[3] = cancel flag. ARGV = owner, ttl, then each token's
# data. Token events held back while Redis was unreachable are sent only if the job is still the
# sender's, so that a worker that lost its job never writes into the stream of the attempt that took over.
# Returns -1 when the job is no longer the sender's, else 1 when a cancel is pending, 0 when not.
SEND_HELD_TOKENS_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return -1
end
for i = 3, #ARGV do redis.call('XADD', KEYS[2], '*', 'type', 'token', 'data', ARGV[i]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return redis.call('EXISTS', KEYS[3])
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


# KEYS[1] = the Celery queue's list, KEYS[2] = the set of jobs admitted and not yet in it, KEYS[3] = the new
# job's hash. ARGV = the most jobs that may wait, now, the job's id, its TTL, then its field/value pairs.
# Admits a submission only while waiting plus arriving jobs stay under the bound, counting it as arriving until
# the API has enqueued it: a burst of submissions cannot all read a short queue and overflow it together. An
# admitted job's record is written in the same step (one round trip).
# Returns {1, depth} admitted, {0, depth} refused (nothing written).
ADMIT_SCRIPT = """
local depth = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if depth >= tonumber(ARGV[1]) then return {0, depth} end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[3], ARGV[4])
return {1, depth}
"""
#: How long an admitted job may take to reach the Celery queue before a worker sends it itself (its API
#: process died in between).
ARRIVING_GRACE_S = 30


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


def is_orphaned(job_id: str, job: Mapping[str, str], owner_heartbeat: Mapping[str, str]) -> bool:
    """Whether a `running` job has lost its worker: the owner's heartbeat is gone (it died), or a heartbeat
    written after the claim names another current job (the owner is alive but gave the job up, e.g. its
    end could not be written while Redis was down). A heartbeat from before the claim proves nothing."""
    if not owner_heartbeat:
        return True
    beat_at = float(owner_heartbeat.get("last_heartbeat") or 0)
    started_at = float(job.get("started_at") or 0)
    return beat_at > started_at and owner_heartbeat.get("current_job", "") != job_id


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
