# Helpers sourced by the run and test scripts. Expects $PY (the venv's python).

# Print "host port" of the REDIS_URL the settings resolve to (.env and environment included).
redis_host_port() {
    "$PY" -c 'from urllib.parse import urlparse; from shared.config import get_settings
u = urlparse(get_settings().redis_url); print(u.hostname or "127.0.0.1", u.port or 6379)'
}

redis_answers() {
    "$PY" -c 'import redis, sys; from shared.config import get_settings
try: redis.Redis.from_url(get_settings().redis_url, socket_connect_timeout=1).ping()
except Exception: sys.exit(1)' 2>/dev/null
}

# Start redis-server if nothing answers at REDIS_URL; sets STARTED_REDIS_PID to what it started.
# With a folder argument it keeps its data there (AOF, fsync every second), so a restart keeps the jobs;
# without, in memory only. In a session of its own, so that a Ctrl-C reaches it only through
# stop_started_redis, once the processes that use it have stopped.
STARTED_REDIS_PID=""
ensure_redis() {
    local data_dir=${1:-}
    if redis_answers; then return 0; fi
    if ! command -v redis-server >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo ">> installing redis-server (Debian package)"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
        else
            echo "!! no Redis answers at REDIS_URL and redis-server is not installed; install it (apt-get install redis-server) or point REDIS_URL at one" >&2
            return 1
        fi
    fi
    read -r host port < <(redis_host_port)
    local persistence=(--save "" --appendonly no)
    if [ -n "$data_dir" ]; then
        mkdir -p "$data_dir"
        persistence=(--save "" --appendonly yes --appendfsync everysec --dir "$data_dir")
        echo ">> starting redis-server on $host:$port (append-only file in $data_dir)"
    else
        echo ">> starting redis-server on $host:$port (in-memory only)"
    fi
    setsid redis-server --bind "$host" --port "$port" "${persistence[@]}" --daemonize no --loglevel warning &
    STARTED_REDIS_PID=$!
    for _ in $(seq 50); do redis_answers && return 0; sleep 0.1; done
    echo "!! redis-server did not come up on $host:$port" >&2
    return 1
}

stop_started_redis() {
    if [ -n "$STARTED_REDIS_PID" ]; then
        kill "$STARTED_REDIS_PID" 2>/dev/null || true
        wait "$STARTED_REDIS_PID" 2>/dev/null || true
    fi
}
