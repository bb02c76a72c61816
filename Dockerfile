# One image for api, worker and flower; compose picks the command.
FROM python:3.11-slim
WORKDIR /app
# Everything the worker downloads or builds goes to the `models` volume, so that it outlives the container:
# the models and their conversions, Hugging Face downloads, the compile cache, the CPU kernels.
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MODEL_CACHE_DIR=/models HF_HOME=/models/huggingface \
    TORCH_EXTENSIONS_DIR=/models/torch_extensions
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
# Not root (Celery warns against it). A new `models` volume takes the ownership of /models from the image.
RUN useradd --create-home --uid 1000 app && mkdir -p /models && chown app /models
USER app
