# One image for api, worker and flower; compose picks the command.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MODEL_CACHE_DIR=/models
# g++: the worker builds its CPU expert kernel at first use (without it, CPU experts dequantize, then multiply)
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
# The dependencies first, in a layer of their own (torch alone is gigabytes): a change to the code rebuilds
# only the layers below.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY README.md ./
COPY shared shared
COPY api api
COPY worker worker
COPY cli cli
RUN pip install --no-deps .
