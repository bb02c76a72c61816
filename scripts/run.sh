#!/usr/bin/env bash
# Foreground: Redis (only if none answers), the Celery worker and the API. Ctrl-C stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
. scripts/lib.sh

PIDS=()
cleanup() {
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    stop_started_redis
}
trap cleanup EXIT INT TERM

ensure_redis
read -r API_HOST API_PORT QUEUE < <("$PY" -c 'from shared.config import get_settings as g; s = g()
print(s.api_host, s.api_port, s.queue_name)')

# threads pool, one thread: one job at a time, while the main thread keeps Celery's events and
# remote control alive for Flower during long generations.
.venv/bin/celery -A worker.main worker --pool threads --concurrency 1 -Q "$QUEUE" -E --loglevel info &
PIDS+=($!)
.venv/bin/uvicorn api.main:app --host "$API_HOST" --port "$API_PORT" &
PIDS+=($!)
echo ">> API on http://$API_HOST:$API_PORT (503 until the worker has loaded the model); Ctrl-C stops"
wait -n "${PIDS[@]}"
