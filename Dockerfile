# One image for api, worker and flower; compose picks the command.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MODEL_CACHE_DIR=/models
# g++: the worker builds its CPU expert kernel at first use (without it, CPU experts dequantize, then multiply)
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY shared shared
COPY api api
COPY worker worker
COPY cli cli
RUN pip install .
