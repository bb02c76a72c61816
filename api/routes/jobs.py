from fastapi import APIRouter

from api.deps import JobServiceDep
from api.errors import error_responses
from shared.schemas import JobView

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobView, responses=error_responses(404))
async def read_job(job_id: str, jobs: JobServiceDep) -> JobView:
    """Status (queued, running, succeeded, failed, cancelled), result or error, and progress."""
    return await jobs.get(job_id)


@router.delete("/{job_id}", response_model=JobView, responses=error_responses(404, 409))
async def cancel_job(job_id: str, jobs: JobServiceDep) -> JobView:
    """Cancel a queued job at once, or a running one at its next token."""
    return await jobs.cancel(job_id)
