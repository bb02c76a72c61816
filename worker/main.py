"""Entry point of the worker: `celery -A worker.main worker` (see the Makefile for the options).

The model is loaded in `celeryd_after_setup`: after Celery has set up logging (so loading shows its
progress) and before the consumer starts (so the worker takes no job until it is ready). Its heartbeat
says "loading" meanwhile, and the API answers 503.
"""

import logging

from celery.apps.worker import Worker
from celery.signals import celeryd_after_setup, worker_shutdown

from shared.celery_app import celery_app
from worker import tasks  # noqa: F401  (registers the tasks)
from worker.recovery import recover_orphaned_jobs, send_jobs_left_unsent
from worker.redis_outage import RedisUnreachable
from worker.runtime import WorkerRuntime, start_runtime, stop_runtime

log = logging.getLogger(__name__)

app = celery_app


@celeryd_after_setup.connect
def _load_model(instance: Worker, **_: object) -> None:
    try:
        runtime = start_runtime()
    except RedisUnreachable as error:
        # Celery would go on retrying its own connection: exit instead, so that the supervisor restarts the
        # worker (with its back-off) and the failure shows.
        log.critical("%s: Redis never answered within REDIS_RETRY_S; the worker exits", error)
        raise SystemExit(1) from error
    except Exception:
        # start_runtime logged why and left the heartbeat "failed", which /health shows. A worker without a
        # model would fail every job it took, jobs a healthy worker on the same queue could run: take none.
        queues = instance.app.amqp.queues
        queues.deselect(list(queues.consume_from))
        log.error("this worker takes no jobs: its model did not load (above); fix it, then restart the worker")
        return
    _recover(runtime)
    # From now on, every heartbeat also looks for jobs a dead worker or API process left behind.
    runtime.heartbeat.on_tick = lambda: _recover(runtime)


def _recover(runtime: WorkerRuntime) -> None:
    recover_orphaned_jobs(runtime)
    send_jobs_left_unsent(runtime)


@worker_shutdown.connect
def _stop(**_: object) -> None:
    stop_runtime()
