"""Start the real service on this machine (uvicorn API + `celery worker`) for tests and benchmarks.

Each stack gets its own key prefix and queue, so it never touches a running service's data. Needs a
Redis answering at REDIS_URL (`scripts/with_redis.sh` starts one if none does).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("w")
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def start_api(self) -> None:
        self._spawn("api", [str(BIN / "uvicorn"), "api.main:app", "--port", str(self.port), "--log-level", "warning"])
        for _ in range(400):
            try:
                self.http.get("/health")
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("the API did not start: " + (self.log_dir / "api.log").read_text())

    def start_worker(self, name: str = "worker") -> subprocess.Popen:
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
                "info",
            ],
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
        raise RuntimeError("the worker never became healthy: " + (self.log_dir / "worker.log").read_text()[-3000:])

    def close(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for key in self.redis.scan_iter(f"{self.prefix}:*"):
            self.redis.delete(key)
        self.redis.delete(self.prefix)  # the Celery queue list
