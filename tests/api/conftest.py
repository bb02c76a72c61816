"""API unit tests: the real app and the real job runner, over fakeredis, with a scripted 'engine'.

`send_task` runs the worker's own `JobRunner` in a thread against the same fake server, so these tests
cover the Redis protocol between the two sides; the integration tests cover the real processes.
"""

import contextlib
import json
import threading
from collections.abc import Callable

import fakeredis
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shared.config import Settings
from shared.redis_keys import RedisKeys
from shared.schemas import GenerationOutcome, WorkerState
from shared.task_names import BENCHMARK_TASK
from worker.heartbeat import Heartbeat
from worker.job_runner import JobContext, JobRunner

#: The model id the scripted worker announces.
SERVED_MODEL = "bundled:SmolLM2-135M-Instruct"

Work = Callable[[JobContext, dict], tuple[dict, str]]


def outcome(text: str, tokens: int = 3) -> dict:
    return {
        "text": text,
        "tokens_generated": tokens,
        "generation_time": 0.5,
        "tokens_per_second": tokens / 0.5,
        "memory_used_gb": 0.1,
        "prompt_tokens": 4,
        "finish_reason": "length",
    }


def echo_work(context: JobContext, params: dict) -> tuple[dict, str]:
    words = ["echo:", *params.get("prompt", "").split()]
    for word in words:
        context.emit(word + " ")
    return outcome(" ".join(words), len(words)), "length"


def benchmark_work(context: JobContext, params: dict) -> tuple[dict, str]:
    """A benchmark report of the requested size, as the worker's benchmark job would answer."""
    prompts = [{"prompt_length": 8, "output_length": 3, "tokens_per_second": 6.0, "memory_used_gb": 0.1}] * params[
        "iterations"
    ]
    report = {
        "benchmark_type": params["test_type"],
        "iterations": len(prompts),
        "avg_tokens_per_second": 6.0,
        "min_tokens_per_second": 6.0,
        "max_tokens_per_second": 6.0,
        "p95_tokens_per_second": 6.0,
        "avg_memory_usage_gb": 0.1,
        "test_prompts": prompts,
    }
    return report, "stop"


class InlineCelery:
    """Stands in for the broker: hands each task straight to a JobRunner thread."""

    def __init__(self, runner: JobRunner):
        self.runner = runner
        self.work: Work = echo_work
        self.sent: list[tuple[str, list]] = []
        self.threads: list[threading.Thread] = []
        self.hold = False  # True: accept tasks but leave them queued

    def send_task(self, name: str, args: list, task_id: str, queue: str) -> None:
        self.sent.append((name, args))
        if self.hold:
            return
        (job_id,) = args  # the id alone: the worker reads the parameters from the record

        def run() -> None:
            # The runner re-raises for Celery's sake, after recording the failure.
            stream_tokens = False if name == BENCHMARK_TASK else None
            with contextlib.suppress(Exception), self.runner.claimed(job_id, stream_tokens) as job:
                if job is None:
                    return
                if name == BENCHMARK_TASK:
                    job.finish(*benchmark_work(job, job.params))
                    return
                result, finish_reason = self.work(job, job.params)
                job.finish(result, finish_reason, counted=GenerationOutcome.model_validate(result))

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def params_of(self, index: int = 0) -> dict:
        """The parameters of the `index`th job sent, from its record: the message carries the id alone."""
        _, (job_id,) = self.sent[index]
        return json.loads(self.runner.client.hget(self.runner.keys.job(job_id), "params"))

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=10)


@pytest.fixture
def settings() -> Settings:
    return Settings(
        key_prefix="unit",
        queue_name="unit",
        max_queue_depth=3,
        max_tokens_limit=512,
        sync_wait_timeout_s=5,
        _env_file=None,
    )


@pytest.fixture
def keys(settings) -> RedisKeys:
    return RedisKeys(settings.key_prefix)


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def sync_redis(server):
    return fakeredis.FakeRedis(server=server, decode_responses=True)


@pytest.fixture
def heartbeat(sync_redis, keys, settings) -> Heartbeat:
    beat = Heartbeat(sync_redis, keys, settings, "worker-1", SERVED_MODEL)
    beat.state = WorkerState.READY
    beat.beat()
    return beat


@pytest.fixture
def celery(sync_redis, keys, settings) -> InlineCelery:
    return InlineCelery(JobRunner(sync_redis, keys, settings, "worker-1"))


@pytest.fixture
def client(server, settings, celery):
    async_redis = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    app = create_app(settings, redis_client=async_redis, celery=celery)
    with TestClient(app) as test_client:
        yield test_client
    celery.join()
