#!/usr/bin/env bash
# Foreground: Redis (only if none answers), then supervisord with the API, WORKERS Celery workers (default 1)
# and Flower (FLOWER_PORT; 0 = none), each restarted if it dies (scripts/supervisord.conf). Ctrl-C stops
# what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
. scripts/lib.sh

export RUN_DIR=${RUN_DIR:-$PWD/.run}
export VENV_BIN WORKERS=${WORKERS:-1}
VENV_BIN=$(cd "$(dirname "$PY")" && pwd)
mkdir -p "$RUN_DIR"

trap stop_started_redis EXIT
ensure_redis "$RUN_DIR/redis"
read -r API_HOST API_PORT QUEUE_NAME FLOWER_PORT < <("$PY" -c 'from shared.config import get_settings as g; s = g()
print(s.api_host, s.api_port, s.queue_name, s.flower_port)')
export API_HOST API_PORT QUEUE_NAME FLOWER_PORT FLOWER_AUTOSTART=true
if [ "$FLOWER_PORT" = 0 ]; then FLOWER_AUTOSTART=false FLOWER_PORT=5555; fi

echo ">> API on http://$API_HOST:$API_PORT (503 until a worker has loaded the model)"
if [ "$FLOWER_AUTOSTART" = true ]; then echo ">> Flower on http://127.0.0.1:$FLOWER_PORT (this machine only)"; fi
echo ">> $WORKERS worker(s); supervisord restarts whatever dies; Ctrl-C stops everything"
# Not exec: once supervisord has stopped its programs, the EXIT trap stops the Redis started above.
"$VENV_BIN/supervisord" -c scripts/supervisord.conf
