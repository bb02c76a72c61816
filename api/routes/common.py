"""Response helpers shared by the routes that submit jobs."""

from fastapi import Header
from fastapi.responses import JSONResponse

from shared.schemas import JobAccepted, JobStatus


async def wants_async(prefer: str | None = Header(None, description="`respond-async` to get 202 and a job id")) -> bool:
    """RFC 7240: `Prefer: respond-async` asks for 202 + a job to poll instead of waiting."""
    return prefer is not None and "respond-async" in prefer.lower()


def accepted(job_id: str, status: JobStatus = JobStatus.QUEUED) -> JSONResponse:
    location = f"/jobs/{job_id}"
    body = JobAccepted(id=job_id, status=status, location=location)
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Location": location})
