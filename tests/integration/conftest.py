"""Real processes: a Redis server, `celery worker` with the bundled model, and uvicorn serving the API.

Each test session gets its own key prefix and queue, so it never touches a running service's data.
"""

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(KEY_PREFIX=prefix, QUEUE_NAME=prefix, HEARTBEAT_INTERVAL_S="0.5", HEARTBEAT_STALE_S="3",
               TORCH_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Stack:
    def __init__(self, prefix: str, tmp: Path):
        self.prefix = prefix
        self.env = _environment(prefix)
        self.tmp = tmp
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=120)
        self.redis = redis.Redis.from_url(self.env.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                                          decode_responses=True)
        self.processes: list[subprocess.Popen] = []
        self.health_while_loading: list[tuple[int, dict]] = []

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.tmp / f"{name}.log").open("w")
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def start_api(self) -> None:
        self._spawn("api", [str(BIN / "uvicorn"), "api.main:app", "--port", str(self.port), "--log-level", "warning"])
        for _ in range(200):
            try:
                self.http.get("/health")
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("the API did not start: " + (self.tmp / "api.log").read_text())

    def start_worker(self, name: str = "worker") -> subprocess.Popen:
        process = self._spawn(name, [str(BIN / "celery"), "-A", "worker.main", "worker", "--pool", "threads",
                                     "--concurrency", "1", "-Q", self.prefix, "-E", "--hostname",
                                     f"{name}-{self.prefix}@%h", "--loglevel", "info"])
        return process

    def wait_healthy(self, timeout_s: float = 180) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            response = self.http.get("/health")
            if response.status_code == 200:
                return
            self.health_while_loading.append((response.status_code, response.json()))
            time.sleep(0.2)
        raise RuntimeError("the worker never became healthy: " + (self.tmp / "worker.log").read_text()[-3000:])

    def close(self) -> None:
        for process in reversed(self.processes):
            _stop(process)
        for key in self.redis.scan_iter(f"{self.prefix}:*"):
            self.redis.delete(key)
        self.redis.delete(self.prefix)


@pytest.fixture(scope="session")
def stack(bundled_model_path, tmp_path_factory):
    stack = Stack(f"it-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("stack"))
    try:
        stack.start_api()
        stack.start_worker()
        stack.wait_healthy()
        yield stack
    finally:
        stack.close()


@pytest.fixture
def api_without_worker(tmp_path):
    stack = Stack(f"it-idle-{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        stack.start_api()
        yield stack
    finally:
        stack.close()
