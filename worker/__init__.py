"""The GPU-bound side: one Celery worker process that owns the model and runs jobs one at a time."""
