# One image for api, worker and flower; compose picks the command.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MODEL_CACHE_DIR=/models
COPY pyproject.toml README.md ./
COPY shared shared
COPY api api
COPY worker worker
RUN pip install .
