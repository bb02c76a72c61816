"""The offload engine behind the unchanged API and queue: a real worker serving a tiny Qwen3-Next with
its experts offloaded (6 of 32 slots per layer), against the plain engine on the same checkpoint."""

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.local_stack import LocalStack
from shared.schemas import GenerationParams
from tests.worker.conftest import RecordingControl
from tests.worker.moe_offload.tiny_moe import build_tiny_qwen3_next, float_reference
from worker.engine.moe_offload.config import OffloadConfig
from worker.engine.moe_offload.engine import MoEOffloadEngine
from worker.engine.transformers_engine import TransformersEngine

pytestmark = pytest.mark.integration

PROMPT = "Hello world, tell me a story"


@contextmanager
def _serving(name: str, checkpoint, tmp_path_factory, **settings: str) -> Iterator[tuple[LocalStack, Path]]:
    """A real API and worker serving the tiny MoE at `checkpoint` on the CPU with `settings`; yields the stack
    and its MODEL_CACHE_DIR."""
    cache = tmp_path_factory.mktemp(f"{name}-cache")
    stack = LocalStack(
        f"it-{name}-{uuid.uuid4().hex[:8]}",
        tmp_path_factory.mktemp(f"{name}-stack"),
        MODEL_ID=str(checkpoint),
        MODEL_CACHE_DIR=str(cache),
        OFFLOAD="experts",
        DEVICE="cpu",
        MODEL_DTYPE="float32",
        APPLY_CHAT_TEMPLATE="false",
        HEARTBEAT_INTERVAL_S="0.5",
        HEARTBEAT_STALE_S="3",
        TORCH_THREADS="1",
        **settings,
    )
    try:
        stack.start_api()
        stack.start_worker()
        stack.wait_healthy()
        yield stack, cache
    finally:
        stack.close()


@pytest.fixture(scope="module")
def moe_stack(tmp_path_factory):
    checkpoint = build_tiny_qwen3_next(tmp_path_factory.mktemp("tiny-moe"))
    # float32 dense layers, as the plain engine's: the experts' offload alone is compared
    settings = dict(EXPERT_QUANT="bf16", EXPERT_SLOTS="6", EXPERT_MISSES="hybrid", CPU_WEIGHTS="float")
    with _serving("moe", checkpoint, tmp_path_factory, **settings) as (stack, _):
        yield stack, checkpoint


def test_offloaded_moe_serves_through_the_queue_the_text_the_plain_engine_generates(moe_stack):
    stack, checkpoint = moe_stack
    response = stack.http.post("/inference", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()

    plain = TransformersEngine(float_reference(checkpoint))
    plain.load()
    control = RecordingControl()
    expected = plain.generate(GenerationParams(prompt=PROMPT, max_tokens=16, temperature=0.0), control)
    assert body["tokens_generated"] == expected.tokens_generated > 0
    assert body["text"] == expected.text
    assert stack.http.get("/health").json()["model_ready"] is True

    # The worker's heartbeat carries the expert cache's counters to /metrics (within a beat or two).
    deadline = time.monotonic() + 10
    while True:
        offload = stack.http.get("/metrics").json()["expert_offload"]
        if (offload and offload["hits"] + offload["misses"] > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert offload["slots_per_layer"] == 6 and offload["experts_per_layer"] == 32
    assert offload["misses"] > 0 and offload["bytes_copied"] > 0 and 0 < offload["hit_rate"] < 1
    assert offload["miss_mode"] == "hybrid" and 0 < offload["cpu_share"] < 1  # timed at load


@pytest.fixture(scope="module")
def cpu_tier_stack(tmp_path_factory):
    """The same tiny MoE served from host RAM as on a PC without a GPU: every expert in place (NF4), the
    dense layers on the int4 kernels."""
    checkpoint = build_tiny_qwen3_next(tmp_path_factory.mktemp("tiny-moe-cpu"))
    settings = dict(EXPERT_QUANT="nf4", CPU_WEIGHTS="int4", DECODE_COMPILE="off")
    with _serving("moe-cpu", checkpoint, tmp_path_factory, **settings) as (stack, cache):
        yield stack, checkpoint, cache


def test_the_cpu_tier_serves_through_the_queue_the_text_its_engine_generates(cpu_tier_stack):
    stack, checkpoint, cache = cpu_tier_stack
    response = stack.http.post("/inference", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()

    config = replace(float_reference(checkpoint), cpu_weights="int4")
    engine = MoEOffloadEngine(config, OffloadConfig(quant="nf4"), cache / "offload")  # converted by the worker
    engine.load()
    assert engine.quantized_linears
    expected = engine.generate(GenerationParams(prompt=PROMPT, max_tokens=16, temperature=0.0), RecordingControl())
    assert body["tokens_generated"] == expected.tokens_generated > 0
    assert body["text"] == expected.text

    deadline = time.monotonic() + 10
    while True:
        offload = stack.http.get("/metrics").json()["expert_offload"]
        if (offload and offload["hits"] > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert offload["slots_per_layer"] == offload["experts_per_layer"] == 32  # every expert in place
    assert offload["hits"] > 0 and offload["misses"] == 0 and offload["bytes_copied"] == 0
