from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import FleetDep, SettingsDep
from api.errors import error_responses
from api.services.status import check_health, collect_metrics
from shared.schemas import HealthResponse, MetricsResponse

router = APIRouter(tags=["status"])


@router.get("/metrics", response_model=MetricsResponse, responses=error_responses(500, 503))
async def read_metrics(request: Request, fleet: FleetDep) -> MetricsResponse:
    return await collect_metrics(fleet, request.app.state.started_at)


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def read_health(fleet: FleetDep, settings: SettingsDep) -> JSONResponse:
    """200 when a worker with the model loaded has a fresh heartbeat; 503 with the same body otherwise."""
    health = await check_health(fleet, settings)
    return JSONResponse(health.model_dump(mode="json"), status_code=200 if health.status == "healthy" else 503)
