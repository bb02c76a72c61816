#!/usr/bin/env bash
# Run a command with a Redis answering at REDIS_URL (started here, and stopped after, if none did).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
. scripts/lib.sh
trap stop_started_redis EXIT
ensure_redis
"$@"
