from fastapi import APIRouter

from api.deps import CallerDep, JobServiceDep
from api.errors import error_responses
from shared.schemas import JobView

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobView, responses=error_responses(404))
async def read_job(job_id: str, jobs: JobServiceDep, caller: CallerDep) -> JobView:
    """Status (queued, running, succeeded, failed, cancelled), result or error, and progress."""
    return await jobs.get(job_id, caller)


@router.delete("/{job_id}", response_model=JobView, responses=error_responses(404, 409))
async def cancel_job(job_id: str, jobs: JobServiceDep, caller: CallerDep) -> JobView:
    """Cancel a queued job at once, or a running one at its next token."""
    return await jobs.cancel(job_id, caller)
