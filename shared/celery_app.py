"""The Celery app, apart from the tasks, so that the API can enqueue by name without the worker's code."""

from celery import Celery

from shared.config import Settings, get_settings


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("moeserve", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=settings.job_ttl_s,
        # One job at a time per worker, acknowledged only once it finished: a worker that dies mid-job
        # leaves the message unacked instead of losing it.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        # Events for Flower: sent, received, started, succeeded, failed. (No task_track_started: it
        # writes to the result backend before each task, and job state lives in our own record.)
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


celery_app = create_celery_app(get_settings())
