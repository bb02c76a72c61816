"""The spec's /metrics and /health bodies, built from worker heartbeats and the metrics hash."""

import time
from datetime import UTC, datetime

import psutil
import redis.exceptions

from api.services.fleet import Fleet, FleetReader
from shared.config import Settings
from shared.schemas import (
    DecodeSpeedCheck,
    ExpertOffloadStats,
    HealthResponse,
    MetricsResponse,
    WorkerHeartbeat,
    WorkerStatus,
)

_GIB = 1024**3


def _per_host(fleet: Fleet) -> dict[str, WorkerHeartbeat]:
    """One heartbeat per machine, so that two workers on one host do not count its memory twice."""
    return {worker.hostname: worker for worker in fleet.workers}


def worker_statuses(workers: list[WorkerHeartbeat], now: float) -> list[WorkerStatus]:
    return [
        WorkerStatus(
            id=worker.worker_id,
            hostname=worker.hostname,
            state=worker.state,
            model=worker.model,
            device=worker.device,
            current_job=worker.current_job or None,
            heartbeat_age_s=round(max(0.0, now - worker.last_heartbeat), 3),
            tokens_per_second=round(worker.tokens_per_second, 3) if worker.tokens_per_second else None,
        )
        for worker in workers
    ]


async def collect_metrics(reader: FleetReader, started_at: float) -> MetricsResponse:
    fleet = await reader.read()
    counters = await reader.metrics()
    hosts = _per_host(fleet).values()
    if hosts:
        system_used = sum(host.system_memory_used_gb for host in hosts)
    else:  # no worker: report the API's own machine
        memory = psutil.virtual_memory()
        system_used = (memory.total - memory.available) / _GIB
    return MetricsResponse(
        model_loaded=bool(fleet.ready),
        gpu_memory_used_gb=round(sum(host.gpu_memory_used_gb for host in hosts), 3),
        gpu_memory_total_gb=round(sum(host.gpu_memory_total_gb for host in hosts), 3),
        system_memory_used_gb=round(system_used, 3),
        avg_tokens_per_second=round(float(counters.get("avg_tokens_per_second", 0.0)), 3),
        total_inferences=int(counters.get("total_inferences", 0)),
        uptime_seconds=round(time.time() - started_at, 3),
        expert_offload=ExpertOffloadStats.over_workers([w.expert_offload for w in fleet.ready if w.expert_offload]),
        workers=worker_statuses(fleet.workers, time.time()),
    )


async def check_health(reader: FleetReader, settings: Settings) -> HealthResponse:
    try:
        fleet = await reader.read()
        counters = await reader.metrics()
    except redis.exceptions.RedisError:
        return HealthResponse(
            status="unhealthy", model_ready=False, gpu_available=False, memory_sufficient=False, last_inference=None
        )
    ready = fleet.ready
    memory_sufficient = bool(ready) and all(
        worker.system_memory_available_gb >= settings.min_free_memory_gb for worker in ready
    )
    last = counters.get("last_inference_at")
    speed = decode_speed_check(counters, settings, time.time())
    slow = speed.affects_status and speed.meets_minimum is False
    return HealthResponse(
        status="healthy" if ready and memory_sufficient and not slow else "unhealthy",
        model_ready=bool(ready),
        gpu_available=any(worker.gpu_name or worker.device.startswith("cuda") for worker in ready),
        memory_sufficient=memory_sufficient,
        last_inference=datetime.fromtimestamp(float(last), tz=UTC) if last else None,
        performance=speed,
        workers=worker_statuses(fleet.workers, time.time()),
    )


def decode_speed_check(counters: dict[str, str], settings: Settings, now: float) -> DecodeSpeedCheck:
    """The recent average decode speed against MIN_TOKENS_PER_SECOND; no verdict when no job ran recently."""
    last = counters.get("last_inference_at")
    recent = last is not None and now - float(last) <= settings.health_speed_window_s
    speed = float(counters["avg_tokens_per_second"]) if recent and "avg_tokens_per_second" in counters else None
    return DecodeSpeedCheck(
        meets_minimum=None if speed is None else speed >= settings.min_tokens_per_second,
        recent_tokens_per_second=None if speed is None else round(speed, 3),
        min_tokens_per_second=settings.min_tokens_per_second,
        affects_status=settings.health_requires_min_speed,
    )
