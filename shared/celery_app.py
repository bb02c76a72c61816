"""The Celery app, apart from the tasks, so that the API can enqueue by name without the worker's code."""

from celery import Celery

from shared.config import Settings, get_settings


def create_celery_app(settings: Settings) -> Celery:
    # No result backend: a job's state and result live in its own record (shared/job_record.py), which the
    # API reads; a backend would only add writes after every job.
    app = Celery("moeserve", broker=settings.redis_url)
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # One job at a time per worker, acknowledged only once it finished: a worker that dies mid-job
        # leaves the message unacked instead of losing it.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        # Events for Flower from the worker: received, started, succeeded, failed. Not `task_send_sent_event`:
        # it would add a second Redis write to every submission; the backlog is in /metrics and Flower's
        # broker page instead.
        worker_send_task_events=True,
    )
    return app


celery_app = create_celery_app(get_settings())
