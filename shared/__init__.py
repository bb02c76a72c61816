"""Code both the API and the worker import: settings, schemas, Redis keys, task names, the Celery app.

Nothing here imports torch or transformers, so the API stays light.
"""
