# `make run` and `make test` do all the set-up: venv, install, default model, Redis.
VENV ?= .venv
PY := $(VENV)/bin/python
export PY

.PHONY: install model run test test-unit lint settings-docs bench flower

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

model: install
	$(PY) -m worker.model_store

run: install model
	scripts/run.sh

test: install model
	scripts/with_redis.sh $(PY) -m pytest -v --durations=20

test-unit: install
	scripts/with_redis.sh $(PY) -m pytest -v -m "not integration and not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) scripts/settings_reference.py --check

# docs/configuration.md and .env.example, from the settings classes
settings-docs: install
	$(PY) scripts/settings_reference.py

bench: install model
	scripts/with_redis.sh $(PY) -m benchmarks.serving_overhead

# Flower alone (`make run` starts one too), on FLOWER_PORT
flower: install
	$(VENV)/bin/celery -A shared.celery_app:celery_app flower \
		--port=$$($(PY) -c 'from shared.config import get_settings; print(get_settings().flower_port or 5555)')
