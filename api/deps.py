"""Dependency aliases the routes declare; the objects themselves live on `app.state` (see main.py)."""

from typing import Annotated

from fastapi import Depends, Request

from api.services.auth import Caller, authenticate
from api.services.fleet import FleetReader
from api.services.generation import GenerationJobs
from api.services.jobs import JobService
from shared.config import Settings


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _jobs(request: Request) -> JobService:
    jobs: JobService = request.app.state.jobs
    return jobs


def _generations(request: Request) -> GenerationJobs:
    return GenerationJobs(_jobs(request), _settings(request))


def _fleet(request: Request) -> FleetReader:
    return _jobs(request).fleet


CallerDep = Annotated[Caller, Depends(authenticate)]
SettingsDep = Annotated[Settings, Depends(_settings)]
JobServiceDep = Annotated[JobService, Depends(_jobs)]
GenerationDep = Annotated[GenerationJobs, Depends(_generations)]
FleetDep = Annotated[FleetReader, Depends(_fleet)]
