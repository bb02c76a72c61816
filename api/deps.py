"""Dependency aliases the routes declare; the objects themselves live on `app.state` (see main.py).

Every dependency is `async def`, even with nothing to await: FastAPI runs a plain `def` dependency on a
thread of its pool, a thread hop per dependency per request for what is an attribute read.
"""

from typing import Annotated

from fastapi import Depends, Request

from api.services.auth import Caller, authenticate
from api.services.fleet import FleetReader
from api.services.generation import GenerationJobs
from api.services.jobs import JobService
from shared.config import Settings


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _jobs(request: Request) -> JobService:
    jobs: JobService = request.app.state.jobs
    return jobs


async def _generations(request: Request) -> GenerationJobs:
    return GenerationJobs(request.app.state.jobs, request.app.state.settings)


async def _fleet(request: Request) -> FleetReader:
    jobs: JobService = request.app.state.jobs
    return jobs.fleet


CallerDep = Annotated[Caller, Depends(authenticate)]
SettingsDep = Annotated[Settings, Depends(_settings)]
JobServiceDep = Annotated[JobService, Depends(_jobs)]
GenerationDep = Annotated[GenerationJobs, Depends(_generations)]
FleetDep = Annotated[FleetReader, Depends(_fleet)]
