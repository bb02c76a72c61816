"""Entry point of the worker: `celery -A worker.main worker` (see the Makefile for the options).

The model is loaded in `worker_init`, before the consumer starts, so the worker takes no job until it
is ready; its heartbeat says "loading" meanwhile, and the API answers 503.
"""

from celery.signals import worker_init, worker_shutdown

from shared.celery_app import celery_app
from worker import tasks  # noqa: F401  (registers the tasks)
from worker.recovery import recover_orphaned_jobs, send_jobs_left_unsent
from worker.runtime import WorkerRuntime, start_runtime, stop_runtime

app = celery_app


@worker_init.connect
def _load_model(**_: object) -> None:
    runtime = start_runtime()
    _recover(runtime)
    # From now on, every heartbeat also looks for jobs a dead worker or API process left behind.
    runtime.heartbeat.on_tick = lambda: _recover(runtime)


def _recover(runtime: WorkerRuntime) -> None:
    recover_orphaned_jobs(runtime)
    send_jobs_left_unsent(runtime)


@worker_shutdown.connect
def _stop(**_: object) -> None:
    stop_runtime()
