"""Real processes: a Redis server, `celery worker` with the bundled model, and uvicorn serving the API."""

import uuid

import pytest

from benchmarks.local_stack import LocalStack

# DECODE_COMPILE=off: the int4 weights stay (CPU_WEIGHTS=auto), but a worker (re)start does not pay the
# decode step's compile, which fault tests would pay at every restart.
FAST_HEARTBEAT = {
    "HEARTBEAT_INTERVAL_S": "0.5",
    "HEARTBEAT_STALE_S": "3",
    "TORCH_THREADS": "1",
    "DECODE_COMPILE": "off",
}


@pytest.fixture(scope="session")
def stack(bundled_model_path, tmp_path_factory):
    stack = LocalStack(f"it-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("stack"), **FAST_HEARTBEAT)
    try:
        stack.start_api()
        stack.start_worker()
        stack.wait_healthy()
        yield stack
    finally:
        stack.close()


@pytest.fixture
def api_without_worker(tmp_path):
    stack = LocalStack(f"it-idle-{uuid.uuid4().hex[:8]}", tmp_path, **FAST_HEARTBEAT)
    try:
        stack.start_api()
        yield stack
    finally:
        stack.close()
