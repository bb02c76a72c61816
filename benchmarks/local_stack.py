"""Start the real service on this machine (uvicorn API + `celery worker`) for tests and benchmarks.

Each stack gets its own key prefix and queue, so it never touches a running service's data. Needs a
Redis answering at REDIS_URL (`scripts/with_redis.sh` starts one if none does), or a `RedisServer` of its own.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from shared.redis_keys import RedisKeys

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of one's own on a free loopback port, keeping an append-only file (fsync every second)
    in `data_dir`, so that it can be killed and started again on the same data."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.data_dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:  # also while it loads its data
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not come up on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: a crash, with whatever the last second's fsync had not written lost."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class LocalStack:
    def __init__(self, prefix: str, log_dir: Path, **settings: str):
        self.prefix = prefix
        self.log_dir = log_dir
        self.env = dict(os.environ, KEY_PREFIX=prefix, QUEUE_NAME=prefix, PYTHONUNBUFFERED="1", **settings)
        self.redis_url = self.env.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=300)
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        self.processes: list[subprocess.Popen] = []
        self.health_while_loading: list[tuple[int, dict]] = []

    def _spawn(self, name: str, command: list[str], **settings: str) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("w")
        env = self.env | settings
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def start_api(self, log_level: str = "warning") -> None:
        self._spawn("api", [str(BIN / "uvicorn"), "api.main:app", "--port", str(self.port), "--log-level", log_level])
        self._wait_api("api.log")

    def _wait_api(self, log_name: str) -> None:
        for _ in range(600):
            try:
                self.http.get("/health")
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("the API did not start: " + (self.log_dir / log_name).read_text())

    def start_supervised(self, workers: int = 1) -> subprocess.Popen:
        """`scripts/run.sh` as `make run` runs it: supervisord with the API and `workers` workers (no Flower),
        in a session of its own so that `close` can Ctrl-C it like a terminal would."""
        env = dict(
            self.env,
            API_PORT=str(self.port),
            FLOWER_PORT="0",
            WORKERS=str(workers),
            PY=sys.executable,
            RUN_DIR=str(self.log_dir / "run"),
        )
        log = (self.log_dir / "supervised.log").open("w")
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "run.sh")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        self._wait_api("supervised.log")
        return process

    def workers(self) -> list[dict[str, str]]:
        """The heartbeat of each live worker of this stack, read from Redis."""
        ids = sorted(self.redis.smembers(f"{self.prefix}:workers"))
        beats = [self.redis.hgetall(f"{self.prefix}:worker:{worker_id}") for worker_id in ids]
        return [beat for beat in beats if beat]

    def job(self, job_id: str) -> dict[str, str]:
        return self.redis.hgetall(f"{self.prefix}:job:{job_id}")

    def terminal_events(self, job_id: str) -> int:
        """How many `done` or `error` events the job's stream holds (exactly one once it ended)."""
        entries = self.redis.xrange(f"{self.prefix}:job:{job_id}:events")
        return sum(fields["type"] in ("done", "error") for _, fields in entries)

    def token_events(self, job_id: str) -> int:
        return sum(fields["type"] == "token" for _, fields in self.redis.xrange(f"{self.prefix}:job:{job_id}:events"))

    def start_worker(self, name: str = "worker", log_level: str = "info", **settings: str) -> subprocess.Popen:
        """`celery worker` on this stack's queue; `settings` override the stack's for this worker alone."""
        return self._spawn(
            name,
            [
                str(BIN / "celery"),
                "-A",
                "worker.main",
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                "1",
                "-Q",
                self.prefix,
                "-E",
                "--hostname",
                f"{name}-{self.prefix}@%h",
                "--loglevel",
                log_level,
            ],
            **settings,
        )

    def wait_healthy(self, timeout_s: float = 180) -> None:
        """Poll /health until 200, keeping what it answered meanwhile."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            response = self.http.get("/health")
            if response.status_code == 200:
                return
            self.health_while_loading.append((response.status_code, response.json()))
            time.sleep(0.2)
        logs = [self.log_dir / name for name in ("worker.log", "supervised.log")]
        tail = "".join(log.read_text()[-3000:] for log in logs if log.exists())
        raise RuntimeError("the worker never became healthy: " + tail)

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                self.stop(process)
        for key in self.redis.scan_iter(RedisKeys(self.prefix).every_key_pattern()):
            self.redis.delete(key)
        self.redis.delete(RedisKeys.celery_queue(self.prefix))

    @staticmethod
    def stop(process: subprocess.Popen, timeout_s: float = 30) -> None:
        """SIGTERM; a supervised stack (a session of its own) gets SIGINT in its whole group, as from Ctrl-C."""
        supervised = os.getpgid(process.pid) == process.pid
        if supervised:
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            if supervised:
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()
            process.wait()
