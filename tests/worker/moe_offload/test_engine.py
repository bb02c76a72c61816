"""The offload engine behind the worker's Engine interface: the same text as the plain engine."""

import logging
import math
import os
import shutil

import pytest
import torch

from shared.schemas import ExpertCacheCounters, GenerationParams
from tests.worker.conftest import RecordingControl
from tests.worker.moe_offload.conftest import TEST_DEVICE
from tests.worker.moe_offload.tiny_moe import float_reference
from worker.engine.base import InvalidGenerationInput
from worker.engine.config import EngineConfig
from worker.engine.moe_offload.budget import MemoryBudgetError
from worker.engine.moe_offload.config import OffloadConfig
from worker.engine.moe_offload.converter import is_converted
from worker.engine.moe_offload.cpu_moe_block import CpuSparseMoeBlock
from worker.engine.moe_offload.engine import MoEOffloadEngine, converted_folder
from worker.engine.moe_offload.offloaded_experts import OffloadedExperts
from worker.engine.transformers_engine import TransformersEngine
from worker.engine_factory import create_engine
from worker.settings import EngineSettings

Setup = tuple[EngineSettings, OffloadConfig]


def _settings(checkpoint, tmp_path, **overrides) -> Setup:
    """Engine settings and the offload config from one set of values (the offload ones by their field names)."""
    values = dict(model_id=str(checkpoint), model_cache_dir=tmp_path, device="cpu", model_dtype="float32")
    values.update(overrides)
    engine = {key: value for key, value in values.items() if key in EngineSettings.model_fields}
    offload = {key: value for key, value in values.items() if key not in engine}
    return EngineSettings(_env_file=None, **engine), OffloadConfig(**offload)


def _create(setup: Setup, **updates):
    engine, offload = setup
    engine = engine.model_copy(update={k: v for k, v in updates.items() if k in EngineSettings.model_fields})
    offload = offload.model_copy(update={k: v for k, v in updates.items() if k in OffloadConfig.model_fields})
    return create_engine(engine.model_id, engine, offload)


def _tiny(folder, **overrides) -> EngineConfig:
    return EngineConfig(str(folder), "tiny", device="cpu", dtype="float32", **overrides)


def _generate(engine, prompt="Hello world, tell me a story", max_tokens=16):
    control = RecordingControl()
    outcome = engine.generate(GenerationParams(prompt=prompt, max_tokens=max_tokens, temperature=0.0), control)
    return outcome, "".join(control.pieces)


def test_offload_engine_converts_once_and_generates_what_the_plain_engine_does(tiny_checkpoint, tmp_path):
    # float32 dense layers (not the CPU's int4 default): the experts' offload alone against the plain engine
    settings = _settings(tiny_checkpoint, tmp_path, offload="experts", quant="bf16", slots=6, cpu_weights="float")
    engine = _create(settings)
    assert isinstance(engine.inner, MoEOffloadEngine)
    engine.load()
    assert is_converted(converted_folder(tmp_path / "offload", str(tiny_checkpoint), "bf16"))

    plain = TransformersEngine(float_reference(tiny_checkpoint))
    plain.load()
    # bf16 rows against float32 experts: tiny differences, the same greedy tokens on this prompt
    outcome, text = _generate(engine)
    plain_outcome, plain_text = _generate(plain)
    assert outcome.tokens_generated == plain_outcome.tokens_generated > 0
    assert text == outcome.text == plain_text
    stats = engine.expert_offload_stats()  # what the heartbeat publishes
    assert stats.misses > 0 and stats.hits > 0 and stats.slots_per_layer == 6 and stats.experts_per_layer == 32
    assert stats.miss_mode == "copy" and stats.cpu_share == 0 and stats.computed_on_host == 0  # auto on a CPU: copy

    # A restart finds the converted folder and does not convert again; misses computed from host rows
    # (EXPERT_MISSES=cpu) give the same text.
    again = _create(settings, misses="cpu")
    folder = converted_folder(tmp_path / "offload", str(tiny_checkpoint), "bf16")
    marker = (folder / "offload-manifest.json").stat().st_mtime_ns
    again.load()
    assert (folder / "offload-manifest.json").stat().st_mtime_ns == marker
    assert _generate(again)[1] == text
    assert again.expert_offload_stats().computed_on_host > 0


def test_host_budget_smaller_than_the_experts_is_refused_clearly(tiny_checkpoint, converted, tmp_path):
    config = OffloadConfig(quant="nf4", host_memory_gb=0.0001)
    engine = MoEOffloadEngine(_tiny(converted("nf4")), config, tmp_path)
    with pytest.raises(MemoryBudgetError, match="host RAM"):
        engine.load()


def test_graph_decode_without_a_compiled_decode_says_so_and_decodes_through_the_host(converted, tmp_path, caplog):
    config = OffloadConfig(quant="nf4", slots=6, decode="graph")
    engine = MoEOffloadEngine(_tiny(converted("nf4"), decode_compile="off"), config, tmp_path)
    with caplog.at_level(logging.WARNING, logger="worker.engine.moe_offload.engine"):
        engine.load()
    assert "EXPERT_DECODE=graph takes effect in a compiled decode only" in caplog.text
    layers = [m for m in engine.model.modules() if isinstance(m, OffloadedExperts)]
    assert layers and all(m.graph_decode is None for m in layers)


def test_a_changed_local_checkpoint_is_converted_again(tiny_checkpoint, tmp_path):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")
    settings = _settings(checkpoint, tmp_path, offload="experts", quant="bf16", slots=6)
    manifest = converted_folder(tmp_path / "offload", str(checkpoint), "bf16") / "offload-manifest.json"
    _create(settings).load()
    first = manifest.stat().st_mtime_ns
    _create(settings).load()
    assert manifest.stat().st_mtime_ns == first  # unchanged: loaded as converted

    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    _create(settings).load()
    assert manifest.stat().st_mtime_ns != first


@pytest.mark.slow
def test_compiled_decode_generates_what_eager_decode_does_and_replays_the_same_graphs(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """DECODE_COMPILE=on on the CPU (inductor; CUDA graphs where MOE_TEST_DEVICE=cuda, via gpu_check.sh): the
    graph breaks at the offloaded experts and the rest of each layer runs compiled over a static cache."""
    import torch._dynamo.utils

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the engine points it under MODEL_CACHE_DIR

    settings = _settings(
        tiny_checkpoint,
        tmp_path,
        offload="experts",
        quant="bf16",
        slots=6,
        device=TEST_DEVICE.type,
        max_model_len=96,
        decode="host",
    )
    eager = _create(settings, decode_compile="off")
    eager.load()
    compiled = _create(settings, decode_compile="on")
    compiled.load()  # compiles here, with a warm-up generation
    assert eager.inner.compiled is None and compiled.inner.compiled is not None
    experts = [m for m in compiled.inner.model.modules() if isinstance(m, OffloadedExperts)]
    assert experts and all(m.decode_compiled for m in experts)  # their decode math: a graph per layer
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 1  # pieces between the experts' graph breaks
    assert any((tmp_path / "compile").rglob("*.py"))  # what inductor built, kept for the next start

    cache = compiled.inner.compiled.caches[96]
    for prompt in ("Hello world, tell me a story", "The quick brown fox"):
        outcome, text = _generate(compiled, prompt, max_tokens=20)
        assert outcome.tokens_generated > 0 and text == _generate(eager, prompt, max_tokens=20)[1]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompiles for a new request
    keys = [layer.keys for layer in cache.layers if getattr(layer, "keys", None) is not None]
    assert keys and all(k.shape[2] == 96 for k in keys)  # the static cache, filled in place
    assert compiled.expert_offload_stats().misses > 0  # the experts really ran eagerly, through the cache

    with pytest.raises(InvalidGenerationInput, match="96 tokens"):  # MAX_MODEL_LEN bounds a request
        _generate(compiled, max_tokens=90)


@pytest.mark.slow
def test_the_cpu_tier_compiled_generates_what_it_generates_eagerly(converted, tmp_path, monkeypatch):
    """DECODE_COMPILE=on with every expert in place, int4 dense layers, the fused DeltaNet layer decode and the
    CPU MoE blocks: one graph a step (no break anywhere in a layer), the same greedy text as eager decode."""
    import torch._dynamo.utils

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the engine points it under its cache folder
    folder = converted("nf4")
    eager = MoEOffloadEngine(
        _tiny(folder, cpu_weights="int4", decode_compile="off"), OffloadConfig(quant="nf4"), tmp_path
    )
    eager.load()
    torch._dynamo.utils.counters.clear()
    compiled = MoEOffloadEngine(
        _tiny(folder, cpu_weights="int4", decode_compile="on", max_model_len=96), OffloadConfig(quant="nf4"), tmp_path
    )
    compiled.load()  # compiles here, with a warm-up generation
    assert compiled.compiled is not None
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert all(m.in_place_kernel is not None for m in compiled.model.modules() if isinstance(m, OffloadedExperts))
    for prompt in ("Hello world, tell me a story", "The quick brown fox"):
        assert _generate(compiled, prompt, max_tokens=20)[1] == _generate(eager, prompt, max_tokens=20)[1]


@pytest.mark.slow
def test_graph_decode_keeps_each_step_on_the_device_and_generates_what_eager_decode_does(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """EXPERT_DECODE=graph: no graph break at the experts; a step reads each routed expert from its slot or from
    host memory, and between steps the misses are counted and copied into slots."""
    import torch._dynamo.utils

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    settings = _settings(
        tiny_checkpoint,
        tmp_path,
        offload="experts",
        quant="bf16",
        slots=6,
        device=TEST_DEVICE.type,
        max_model_len=96,
        decode_compile="on",
    )
    eager = _create(settings, decode_compile="off")
    eager.load()
    torch._dynamo.utils.counters.clear()
    graph = _create(settings)  # EXPERT_DECODE=auto: graph, since decode compiles
    graph.load()
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0  # the experts are inside the graph
    layers = [m for m in graph.inner.model.modules() if isinstance(m, OffloadedExperts)]
    assert layers and all(m.graph_decode is not None for m in layers)

    graph_decode = graph.inner.offloaded.experts.graph_decode
    between_steps, in_steps, steps = graph_decode.between_steps, ExpertCacheCounters(), []

    def counting_steps() -> None:  # what the decode steps account for, apart from the prompts' host path
        first = graph.inner.offloaded.experts.cache_stats()
        steps.append(graph_decode.routes[0, 0].item() >= 0)
        between_steps()
        last = graph.inner.offloaded.experts.cache_stats()
        for name, value in last.counters().items():
            setattr(in_steps, name, getattr(in_steps, name) + value - getattr(first, name))

    monkeypatch.setattr(graph_decode, "between_steps", counting_steps)
    before = graph.expert_offload_stats()
    for prompt in ("Hello world, tell me a story", "The quick brown fox"):
        outcome, text = _generate(graph, prompt, max_tokens=20)
        assert outcome.tokens_generated > 0 and text == _generate(eager, prompt, max_tokens=20)[1]
    after = graph.expert_offload_stats()
    decoded = after.hits + after.misses - before.hits - before.misses
    assert decoded > 0 and after.misses > before.misses  # counted from the steps' routes
    # The steps' misses were refilled into slots from their gather scratch, device to device: no slot was
    # filled over the bus between steps, so the bus carried each miss once (the step's read) where it used to
    # carry it twice (the step's read and the refill's copy).
    tokens, row_bytes = sum(steps), layers[0].cache.row_bytes
    assert tokens > 0 and in_steps.misses > 0 and in_steps.bytes_copied == 0
    assert 0 < in_steps.bytes_copied_on_device <= in_steps.misses * row_bytes
    # the torch path (this one, on the CPU) brings every routed expert's host row into the scratch
    assert in_steps.bytes_gathered == (in_steps.hits + in_steps.misses) * row_bytes
    bus_per_token, bus_per_token_before = (
        in_steps.bytes_over_bus / tokens,
        (in_steps.bytes_over_bus + in_steps.bytes_copied_on_device) / tokens,
    )
    assert bus_per_token < bus_per_token_before
    if TEST_DEVICE.type == "cuda":
        torch.cuda.synchronize()  # every refill landed: the next between-steps sends them all
    graph_decode.between_steps()
    for index, layer in enumerate(layers):  # the device's table says where each expert's bytes are
        for expert, slot in enumerate(graph_decode.table[index].tolist()):
            assert (slot >= 0) == layer.cache.holds(expert)
            if slot >= 0:
                assert torch.equal(layer.cache.buffer[slot].cpu(), layer.cache.host_rows[expert].cpu())


def _teacher_forced_nll(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()


def test_the_cpu_tier_runs_every_expert_in_place_and_the_dense_layers_on_the_int4_kernels(converted, tmp_path):
    """OFFLOAD=experts on the CPU with every expert in host RAM: the experts go through the 4-bit kernel over
    their rows (no slots, nothing dequantized) and the dense layers on the int4/q8 kernels. The kernel gives the
    greedy tokens that dequantize-then-multiply gives over the same model. Against the float reference (the same
    4-bit experts dequantized, float32 dense layers) the teacher-forced perplexity stays within 2%, the int4
    dense layers' tolerance for the bundled model too (measured 1.35% here: random weights are 4-bit's worst
    case, and this model's near-flat logits let them flip greedy tokens, so tokens are not compared there)."""
    folder = converted("nf4")
    fast = MoEOffloadEngine(_tiny(folder, cpu_weights="int4"), OffloadConfig(quant="nf4"), tmp_path)
    fast.load()
    reference = MoEOffloadEngine(_tiny(folder, cpu_weights="float"), OffloadConfig(quant="nf4"), tmp_path)
    reference.load()
    experts = [m for m in fast.model.modules() if isinstance(m, OffloadedExperts)]
    assert experts and all(m.in_place_kernel is not None for m in experts)
    assert fast.quantized_linears and not reference.quantized_linears
    for module in reference.model.modules():
        if isinstance(module, OffloadedExperts):
            module.in_place_kernel = None  # the reference dequantizes, then multiplies

    text = _generate(fast, max_tokens=8)[0].text
    stats = fast.expert_offload_stats()
    assert stats.hits > 0 and stats.misses == 0 and stats.bytes_copied == 0
    ids = fast.tokenizer("the ships sail on the sea at night and the stars are out above them", return_tensors="pt")
    fast_nll = _teacher_forced_nll(fast.model, ids["input_ids"])
    reference_nll = _teacher_forced_nll(reference.model, ids["input_ids"])
    assert abs(math.exp(fast_nll - reference_nll) - 1) <= 0.02

    kernels = [module.in_place_kernel for module in experts]
    for module in experts:
        module.in_place_kernel = None
    assert _generate(fast, max_tokens=8)[0].text == text  # the same model, its experts dequantized
    for module, kernel in zip(experts, kernels, strict=True):
        module.in_place_kernel = kernel
    blocks = [m for m in fast.model.modules() if isinstance(m, CpuSparseMoeBlock)]
    assert len(blocks) == len(experts)  # every MoE block on the CPU kernels
