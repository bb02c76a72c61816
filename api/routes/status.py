import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import CallerDep, FleetDep, SettingsDep
from api.errors import error_responses
from api.services.prometheus import exposition, read_snapshot
from api.services.status import check_health, collect_metrics
from shared.schemas import HealthResponse, MetricsResponse

router = APIRouter(tags=["status"])


@router.get("/metrics", response_model=MetricsResponse, responses=error_responses(500, 503))
async def read_metrics(request: Request, fleet: FleetDep, _: CallerDep) -> MetricsResponse:
    return await collect_metrics(fleet, request.app.state.started_at)


@router.get(
    "/metrics/prometheus",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
async def read_prometheus_metrics(fleet: FleetDep, _: CallerDep) -> Response:
    """Queue, jobs, tokens, latency histograms, each worker's heartbeat and memory, expert cache counters."""
    return Response(exposition(await read_snapshot(fleet, time.time())), media_type=CONTENT_TYPE_LATEST)


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def read_health(fleet: FleetDep, settings: SettingsDep) -> JSONResponse:
    """200 when a worker with the model loaded has a fresh heartbeat; 503 with the same body otherwise."""
    health = await check_health(fleet, settings)
    return JSONResponse(health.model_dump(mode="json"), status_code=200 if health.status == "healthy" else 503)
