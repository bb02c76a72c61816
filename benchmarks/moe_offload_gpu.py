"""Decode speed of the expert-offload engine at Qwen3-Next-80B-A3B's real dimensions, on a capped GPU.

Builds transformers' own Qwen3NextForCausalLM with the real shapes (48 layers, hidden 2048, 36 Gated
DeltaNet + 12 attention layers, 512 experts of intermediate 512, top-10, shared expert, vocab 151,936)
and synthetic random weights (nothing downloaded): the resident part on the GPU in bf16, every routed
expert as a 4-bit row in pinned host RAM, served through `OffloadedExperts` and its slot cache, with the
GPU held to `--budget-gb` by `torch.cuda.set_per_process_memory_fraction`. In the same run, as the
baseline, the naive whole-layer offload: every layer's experts copied to the GPU for every token (timed on
`--naive-layers` layers and scaled to all, which the output says). It also measures what the cost model
needs: raw host-to-device bandwidth and the per-expert copy and compute times.

Random routers use every expert about equally, yet consecutive tokens route alike: on an H200 run LRU alone
hit 50% of routed experts with slots for 25% of them, and 85% with prefetch.

    python -m benchmarks.moe_offload_gpu                     # on a GPU: the real thing (~42 GB host RAM)
    python -m benchmarks.moe_offload_gpu --smoke --device cpu   # tiny shapes: checks the script runs
"""

import argparse
import cProfile
import gc
import io
import json
import logging
import platform
import pstats
import statistics
import time
import traceback
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from transformers import Qwen3NextConfig
from transformers.activations import ACT2FN
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm, Qwen3NextRMSNormGated

from benchmarks.model_shapes import REAL_SHAPES, SMOKE_SHAPES
from benchmarks.moe_cost_model import measured_dense_ms
from benchmarks.nvml_memory import MemoryWatch, OverBudgetError, nvml_reader
from benchmarks.route_file import RecordedRoutes
from benchmarks.route_replay import RouteSchedule, install_replay
from benchmarks.routing_stats import RoutingLog, routing_stats
from shared.schemas import ExpertCacheCounters
from worker.engine.compiled_decode import CompiledDecode, configure_compiler, static_cache_bytes
from worker.engine.moe_offload.budget import (
    DeviceMemoryNeeds,
    dequantized_expert_bytes,
    linear_attention_state_bytes,
    plan_memory,
    prefill_activation_bytes,
    process_limit_bytes,
)
from worker.engine.moe_offload.builder import fused_decode_kernels, install_offloaded_experts
from worker.engine.moe_offload.checkpoint import build_skeleton, find_fused_experts
from worker.engine.moe_offload.config import OffloadConfig
from worker.engine.moe_offload.cpu_experts import MissSplit
from worker.engine.moe_offload.graph_decode import GraphDecode
from worker.engine.moe_offload.offloaded_experts import OffloadedExperts, mix_decode
from worker.engine.moe_offload.pacing import Pacer, TokenBucket
from worker.engine.moe_offload.packing import ExpertLayout, pack_expert, unpack_experts
from worker.engine.moe_offload.pinning import pin_in_place

RESULTS = Path(__file__).parent / "results"
_GIB = 1024**3


class Clock:
    """Device-side timestamps: CUDA events on a GPU (no syncs while running), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def materialize_random(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter random values on `device`: N(0, 0.02) matrices, 1-D weights where a real
    checkpoint has them: norms that scale by one, DeltaNet's decay parameters in their trained range."""
    generator = torch.Generator(device=device).manual_seed(0)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            value = torch.empty(param.shape, dtype=dtype, device=device)
            if param.dim() >= 2:
                value.normal_(0.0, 0.02, generator=generator)
            elif name == "A_log":
                value.uniform_(0.0, 2.7, generator=generator)  # log of A in (1, 16)
            elif name == "dt_bias":
                value.fill_(1.0)
            elif isinstance(module, Qwen3NextRMSNormGated):
                value.fill_(1.0)  # DeltaNet's output norm scales by its weight: zero would silence all 36 layers
            elif isinstance(module, Qwen3NextRMSNorm):
                value.zero_()  # the other norms scale by (1 + weight)
            else:
                value.zero_()  # biases
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    model.to(device)


def synthetic_host_rows(layout: ExpertLayout, layers: int, experts: int, pin: bool, pool: int = 16) -> list:
    """Each layer's experts as 4-bit rows: `pool` really quantized random experts, tiled (quantizing 24,576
    experts of 3M weights would take longer than the benchmark; the bytes moved and computed are the same)."""
    generator = torch.Generator().manual_seed(1)
    pool_rows = torch.empty((pool, layout.row_bytes), dtype=torch.uint8)
    for i in range(pool):
        gate_up = torch.randn(2 * layout.intermediate, layout.hidden, generator=generator) * 0.02
        down = torch.randn(layout.hidden, layout.intermediate, generator=generator) * 0.02
        pack_expert(layout, gate_up, down, pool_rows[i])
    rows = []
    for layer in range(layers):
        layer_rows = pool_rows[(torch.arange(experts) + layer) % pool]  # a new tensor, not a view
        rows.append(pin_in_place(layer_rows) if pin else layer_rows)
    return rows


class TimedExperts(torch.nn.Module):
    """Wraps a layer's experts to time them (`marks`: [start, end] per call). A compiled decode breaks its
    graph here as it does at the experts themselves, so the wrapper changes nothing it measures; with graph
    decode (no break) it stands aside, and only the prompt's call is timed."""

    def __init__(self, inner: torch.nn.Module, clock: Clock, layer: int, routing: RoutingLog):
        super().__init__()
        self.inner = inner
        self.clock = clock
        self.layer = layer
        self.routing = routing  # decode steps' routed ids (graph decode's come from its routes instead)
        self.marks: list[list] = []

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if torch.compiler.is_compiling() and getattr(self.inner, "graph_decode", None) is not None:
            return self.inner(hidden_states, top_k_index, top_k_weights)  # inside the step's one graph
        return self._timed(hidden_states, top_k_index, top_k_weights)

    @torch.compiler.disable
    def _timed(self, hidden_states, top_k_index, top_k_weights):
        if hidden_states.shape[0] == 1:
            self.routing.add(self.layer, top_k_index)
        start = self.clock.mark()
        output = self.inner(hidden_states, top_k_index, top_k_weights)
        self.marks.append([start, self.clock.mark()])
        return output


def decode_run(
    model,
    config,
    device,
    tokens: int,
    clock: Clock,
    on_prefill_done=None,
    compiled: CompiledDecode | None = None,
    on_token=None,
) -> dict:
    """Greedy decode of `tokens` tokens after a 16-token prompt, with the experts' device time (`TimedExperts`
    installed) and, in eager mode, each layer's (hooks; a compiled decode has no layer boundaries to time).
    `on_prefill_done` runs once the prompt's forward is over, before the first decode step; `on_token` after
    every token."""
    layers = model.model.layers
    timed = [layer.mlp.experts for layer in layers]
    for experts in timed:
        experts.marks.clear()
    marks: dict[int, list] = {i: [] for i in range(len(layers))}
    hooks = []
    for i, layer in enumerate(layers if compiled is None else []):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: marks[i].append([clock.mark()])))
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: marks[i][-1].append(clock.mark())))
    stamps: list[float] = []

    class Stamp:
        def put(self, value):
            clock.sync()
            stamps.append(time.perf_counter())
            if on_token is not None:
                on_token()
            if len(stamps) == 2 and on_prefill_done is not None:  # the prompt, then the prefill's token
                on_prefill_done()

        def end(self):
            pass

    prompt = torch.randint(0, config.vocab_size, (1, 16), device=device)
    with torch.inference_mode():
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            streamer=Stamp(),
            pad_token_id=0,
            eos_token_id=None,
            **(compiled.generate_kwargs() if compiled is not None else {}),
        )
    clock.sync()
    for hook in hooks:
        hook.remove()
    decode_steps = len(stamps) - 2  # the first put is the prompt, the second the prefill's token
    decode_seconds = stamps[-1] - stamps[1]
    # per-layer and experts' averages over decode steps only (the first call of each is the prefill)
    layer_ms = (
        [
            sum(clock.seconds(s, e) for s, e in marks[i][1:]) / max(1, len(marks[i]) - 1) * 1000
            for i in range(len(layers))
        ]
        if compiled is None
        else None
    )
    expert_ms = sum(clock.seconds(s, e) for experts in timed for s, e in experts.marks[1:]) / max(1, decode_steps)
    return {
        "decode_tokens": decode_steps,
        "decode_seconds": decode_seconds,
        "tok_per_s": decode_steps / decode_seconds,
        "layer_ms": layer_ms,
        "compiled": compiled is not None,
        "expert_ms_per_token": expert_ms * 1000,
        "layer_types": list(config.layer_types),
    }


class DecodeWindow:
    """The cache counters and routes of decode steps only, summed over prompts: `open` once a prompt's forward
    is over, `close` after its last token. With a replay `schedule`, each prompt's routes are checked against
    the recording from where the schedule stood when its decode began."""

    def __init__(self, caches: list, routing: RoutingLog, schedule: RouteSchedule | None):
        self.caches = caches
        self.routing = routing
        self.schedule = schedule
        self.counters = ExpertCacheCounters()
        self._start = ExpertCacheCounters()
        self._position = 0
        self._first_step = 0
        self._segments: list[tuple[int, int, int]] = []  # (schedule position, first logged step, steps)
        routing.clear()  # the warm-up's routes out

    def _total(self) -> ExpertCacheCounters:
        return ExpertCacheCounters.total(cache.stats for cache in self.caches)

    def open(self) -> None:
        self._start = self._total()
        self._position = int(self.schedule.position.item()) if self.schedule is not None else 0
        self._first_step = self.routing.steps(0)

    def close(self) -> None:
        end = self._total()
        for name, value in end.counters().items():
            setattr(self.counters, name, getattr(self.counters, name) + value - getattr(self._start, name))
        self._segments.append((self._position, self._first_step, self.routing.steps(0) - self._first_step))

    def replay_report(self) -> dict | None:
        """Whether every decode step routed to exactly the recorded ids (None without a replay)."""
        if self.schedule is None:
            return None
        per_layer = self.routing.per_layer()
        checked = sum(steps for _, _, steps in self._segments)
        matched = checked > 0 and all(
            per_layer[layer][first : first + steps] == self.schedule.expected(position, steps, layer)
            for position, first, steps in self._segments
            for layer in range(len(per_layer))
        )
        return {"tokens_checked": checked, "matched": matched, "recorded_tokens": self.schedule.tokens}


def measure_bandwidth(device: torch.device, nbytes: int, clock: Clock) -> float:
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target.copy_(source, non_blocking=True)
    clock.sync()
    start = clock.mark()
    for _ in range(5):
        target.copy_(source, non_blocking=True)
    end = clock.mark()
    clock.sync()
    return 5 * nbytes / clock.seconds(start, end) / 1e9


def measure_device_copy(device: torch.device, nbytes: int, clock: Clock) -> float:
    """GB/s of a device-to-device copy (what graph decode's refills from the gather scratch run at)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return nbytes / seconds_per_call(lambda: target.copy_(source), clock, repeats=5) / 1e9


def seconds_per_call(run, clock: Clock, repeats: int = 20) -> float:
    """`run()` once to warm up (and compile), then the mean over `repeats` back-to-back calls."""
    run()
    clock.sync()
    start = clock.mark()
    for _ in range(repeats):
        run()
    end = clock.mark()
    clock.sync()
    return clock.seconds(start, end) / repeats


def time_decode_mix(mix, layout, rows_on_device, dtype, top_k: int, clock: Clock, repeats: int = 20) -> float:
    """Seconds per expert to apply `top_k` experts' rows to one token with `mix` (`mix_decode`'s signature past
    its first three arguments: dequantize-then-multiply, or the fused Triton kernels)."""
    device = rows_on_device.device
    indices = torch.arange(top_k, device=device).repeat(2)  # slots 0..k-1, then routing positions 0..k-1
    weights = torch.rand(top_k, device=device, dtype=dtype)
    x = torch.randn(1, layout.hidden, dtype=dtype, device=device)
    return seconds_per_call(lambda: mix(rows_on_device, indices, weights, x), clock, repeats) / top_k


def naive_layer_seconds(layout, host_rows, device, dtype, top_k, act_fn, clock, layers: int, tokens: int) -> float:
    """Whole-layer offload: all of a layer's experts cross the bus every token, then top-k compute."""
    experts = host_rows[0].shape[0]
    buffer = torch.empty((experts, layout.row_bytes), dtype=torch.uint8, device=device)
    x = torch.randn(layout.hidden, dtype=dtype, device=device)
    total, count = 0.0, 0
    for token in range(tokens + 1):
        for layer in range(layers):
            start = clock.mark()
            buffer.copy_(host_rows[layer], non_blocking=True)
            chosen = torch.randperm(experts, device=device)[:top_k]
            gate_up, down = unpack_experts(layout, buffer.index_select(0, chosen), dtype)
            gate, up = torch.matmul(gate_up, x).chunk(2, dim=-1)
            torch.bmm(down, (act_fn(gate) * up).unsqueeze(-1))
            end = clock.mark()
            clock.sync()
            if token:  # the first pass warms up
                total += clock.seconds(start, end)
                count += 1
    return total / count


VARIANTS = {
    "lru+prefetch": ("offload lru + prefetch", "lru", True, "copy"),
    "hybrid": ("hybrid lru + prefetch", "lru", True, "hybrid"),
    "lru": ("offload lru", "lru", False, "copy"),
    "lfu+prefetch": ("offload lfu + prefetch", "lfu", True, "copy"),
}
# Flags after a variant's name: `:compiled` decodes compiled (`CompiledDecode`: CUDA graphs on a GPU), with
# `:nographs` without the CUDA graphs (inductor's fused kernels only), `:dequant` computes decode's experts by
# dequantize-then-multiply instead of the Triton kernels that auto picks on a GPU, `:graph` keeps a compiled
# decode step on the device (`EXPERT_DECODE=graph`: experts from their slots or read from host RAM, no break),
# with `:norefill` never copying a miss into a slot (the slots keep what the prompt left).
FLAGS = ("compiled", "nographs", "dequant", "graph", "norefill")
# `:h2d=<GB/s>` emulates that bus for the one variant (as `--h2d-gbps` does for all): several buses in one process,
# which compiles once.
H2D_FLAG = "h2d="


def variant_h2d_gbps(flags: list[str], default: float) -> float:
    """The emulated bus a variant runs under (0: the card's own)."""
    return next((float(flag.removeprefix(H2D_FLAG)) for flag in flags if flag.startswith(H2D_FLAG)), default)


def _known_flag(flag: str) -> bool:
    if flag.startswith(H2D_FLAG):
        try:
            return float(flag.removeprefix(H2D_FLAG)) > 0
        except ValueError:
            return False
    return flag in FLAGS


class NoExperts(torch.nn.Module):
    """The experts' output left out: what the rest of the model (attention, DeltaNet, shared expert, routers)
    costs per token on its own."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return torch.zeros_like(hidden_states)


def _profile_host(
    model, config, device, tokens: int, clock: Clock, path: Path, compiled: CompiledDecode | None
) -> None:
    """Where the host's time goes in `tokens` decode steps, prompt left out (cProfile, by own time), printed
    and saved."""
    profiler = cProfile.Profile()
    decode_run(model, config, device, tokens, clock, on_prefill_done=profiler.enable, compiled=compiled)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    path.write_text(text.getvalue())
    print(text.getvalue())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-gb", type=float, default=16.0)
    parser.add_argument(
        "--card-margin-gb",
        type=float,
        default=1.0,
        help="the budget less this is what the whole process may hold as NVML counts it (16 -> 15 GiB)",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=4096, help="tokens the memory plan holds KV cache and prefill for"
    )
    parser.add_argument("--tokens", type=int, default=48, help="decode tokens per prompt")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per variant; tok/s is their median")
    parser.add_argument(
        "--routes", type=Path, default=None, help="replay recorded routing (benchmarks/record_routes.py's .npz)"
    )
    parser.add_argument(
        "--h2d-gbps",
        type=float,
        default=0.0,
        help="emulate a bus of this many GB/s: hold the engine's host-to-device bytes to it (0: the card's own)",
    )
    parser.add_argument(
        "--ttft", default="", help="comma-separated prompt lengths whose time to first token to measure at the end"
    )
    parser.add_argument("--quant", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--naive-layers", type=int, default=4, help="layers timed for the naive baseline")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on a CPU")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, in order, repeats allowed: {', '.join(VARIANTS)}, no-experts "
        "(experts output zeros: the rest of the model alone); each may add :compiled, "
        ":nographs, :dequant, :graph, :norefill, :h2d=<GB/s> (an emulated bus for that variant)",
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="TOKENS",
        help="after the first variant, profile the host side of this many decode steps",
    )
    args = parser.parse_args(argv)
    known = [*VARIANTS, "no-experts"]
    unknown = [
        name
        for name in args.variants.split(",")
        if name.split(":")[0] not in known or not all(_known_flag(flag) for flag in name.split(":")[1:])
    ]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")

    engine_log = logging.getLogger("worker")  # what the engine reports as it builds (kernel tuning, miss split)
    if not engine_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("# %(message)s"))
        engine_log.addHandler(handler)
        engine_log.setLevel(logging.INFO)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # memory caps and stats want an indexed device
        device = torch.device("cuda", torch.cuda.current_device())
    clock = Clock(device)
    shapes = SMOKE_SHAPES if args.smoke else REAL_SHAPES
    config = Qwen3NextConfig(**shapes)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gb * _GIB / total), device)
    print(f"# {card}; budget {args.budget_gb:g} GB; shapes {'smoke' if args.smoke else 'Qwen3-Next-80B-A3B'}")

    started = time.perf_counter()
    model = build_skeleton(config, dtype)
    experts_names = list(find_fused_experts(model))
    layout = ExpertLayout(config.hidden_size, config.moe_intermediate_size, args.quant)
    for name in experts_names:  # drop the 3D expert parameters before materializing the rest
        model.set_submodule(name, torch.nn.Identity())
    materialize_random(model, device, dtype)
    resident_bytes = (
        torch.cuda.memory_allocated(device)
        if device.type == "cuda"
        else sum(p.numel() * p.element_size() for p in model.parameters())
    )
    host_rows = synthetic_host_rows(layout, len(experts_names), config.num_experts, pin=device.type == "cuda")
    print(
        f"# built in {time.perf_counter() - started:.0f} s: resident {resident_bytes / _GIB:.2f} GB on the "
        f"device, experts {len(experts_names) * config.num_experts * layout.row_bytes / _GIB:.1f} GB in host RAM"
    )

    top_k = config.num_experts_per_tok
    graph_variants = any("graph" in name.split(":")[1:] for name in args.variants.split(","))
    needs = DeviceMemoryNeeds(
        kv_cache=static_cache_bytes(config, args.max_model_len, dtype),
        linear_attention_state=linear_attention_state_bytes(config),
        prefill_activations=prefill_activation_bytes(config, args.max_model_len, dtype.itemsize),
        prefill_bytes_per_slot=dequantized_expert_bytes(3 * layout.hidden * layout.intermediate, dtype.itemsize),
        gather_scratch=GraphDecode.scratch_bytes(len(experts_names), top_k, layout.row_bytes) if graph_variants else 0,
    )
    plan = plan_memory(
        device_budget_gb=args.budget_gb,
        reserve_gb=0,
        host_budget_gb=0,
        resident_bytes=resident_bytes,
        num_layers=len(experts_names),
        experts_per_layer=config.num_experts,
        row_bytes=layout.row_bytes,
        top_k=top_k,
        needs=needs,
        card_margin_gb=args.card_margin_gb,
    )
    print(
        "# memory plan (GiB): "
        + ", ".join(f"{name} {value / _GIB:.2f}" for name, value in plan.breakdown.items())
        + f"; process limit {process_limit_bytes(args.budget_gb, args.card_margin_gb) / _GIB:.2f}"
    )
    watch = (
        MemoryWatch(
            nvml_reader(device.index or 0),
            lambda: torch.cuda.max_memory_reserved(device),
            process_limit_bytes(args.budget_gb, args.card_margin_gb),
        )
        if device.type == "cuda"
        else None
    )
    if args.smoke:  # leave most experts out so the smoke run exercises misses and evictions
        plan = plan_memory(
            device_budget_gb=0,
            reserve_gb=0,
            host_budget_gb=0,
            resident_bytes=0,
            num_layers=len(experts_names),
            experts_per_layer=config.num_experts,
            row_bytes=layout.row_bytes,
            top_k=config.num_experts_per_tok,
            slots_override=config.num_experts // 4,
        )
    model.eval()
    schedule: RouteSchedule | None = None
    if args.routes:
        schedule = install_replay(model, RecordedRoutes.load(args.routes))
        print(f"# replaying {schedule.tokens} recorded tokens' routing from {args.routes}")
    act_fn = ACT2FN[config.hidden_act]
    bandwidth = measure_bandwidth(device, 256 * 1024 * 1024 if not args.smoke else 8 * 1024 * 1024, clock)
    d2d_bandwidth = measure_device_copy(device, 256 * 1024 * 1024 if not args.smoke else 8 * 1024 * 1024, clock)
    on_device = host_rows[0][: config.num_experts_per_tok].to(device)
    expert_compute_s = time_decode_mix(
        partial(mix_decode, layout, act_fn, dtype), layout, on_device, dtype, top_k, clock
    )
    fused = fused_decode_kernels("auto", layout, device, config.hidden_act, top_k)
    fused_compute_s = time_decode_mix(fused.from_slots, layout, on_device, dtype, top_k, clock) if fused else None
    del on_device
    report = {
        "card": card,
        "device": str(device),
        "budget_gb": args.budget_gb,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "smoke": args.smoke,
        "memory_plan": {name: value / _GIB for name, value in plan.breakdown.items()},
        "process_limit_gib": process_limit_bytes(args.budget_gb, args.card_margin_gb) / _GIB,
        "routes": str(args.routes) if args.routes else None,
        "h2d_emulated_gbps": args.h2d_gbps or None,
        "prompts": args.prompts,
        "complete": False,
        "shapes": shapes,
        "quant": args.quant,
        "row_bytes": layout.row_bytes,
        "slots_per_layer": plan.slots_per_layer,
        "resident_gb": resident_bytes / _GIB,
        "h2d_gb_per_s": bandwidth,
        "d2d_gb_per_s": d2d_bandwidth,
        "expert_copy_ms": layout.row_bytes / (bandwidth * 1e9) * 1000,
        "expert_compute_ms": expert_compute_s * 1000,
        "non_expert_ms_per_token": None,
        "cpu_expert_ms": None,
        "fused_expert_compute_ms": fused_compute_s * 1000 if fused else None,
        "variants": [],
        "failed": [],
        "naive": None,
    }
    out = args.out or RESULTS / f"moe_offload_gpu-{card.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    fused_note = f", Triton kernels {fused_compute_s * 1000:.3f} ms" if fused else ""
    print(
        f"# H2D {bandwidth:.1f} GB/s; one expert: copy {report['expert_copy_ms']:.3f} ms, "
        f"dequantize + compute {report['expert_compute_ms']:.3f} ms{fused_note} (of {top_k} per token)"
    )

    # The JSON is rewritten after each variant, so a run cut short still reports what it measured.
    experts = [(name, layout, rows) for name, rows in zip(experts_names, host_rows, strict=True)]
    compiled_by_graphs: dict[bool, CompiledDecode] = {}  # one static cache per compile mode, kept across variants

    def free_experts() -> None:
        """The last variant's experts out, and their slots (10 GiB at real shapes) freed before anything else
        takes room: layer by layer, the next variant's slots would otherwise pile up on the last one's wherever
        a reference cycle keeps a replaced layer alive until the next garbage collection, or the compiled
        decode's between-steps hooks (graph decode's) keep it (on an H100 the variant after a graph decode
        one ran out of memory)."""
        for module_name in experts_names:
            model.set_submodule(module_name, NoExperts())
        for compiled in compiled_by_graphs.values():
            compiled.attach(None)  # no experts: no hooks
        gc.collect()
        if device.type == "cuda":
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            # Recorded graphs may hold the last variant's tensors, and a failed recording leaves the tree mid-way
            # (its pool held): the next variant records anew.
            reset_cudagraph_trees()
            torch.cuda.empty_cache()

    def measure(index: int, name: str) -> dict:
        base, *flags = name.split(":")
        is_compiled = "compiled" in flags
        compiled = None
        free_experts()
        if base == "no-experts":
            label, layers, fused = "no experts (rest alone)", None, False
            caches, split = [], MissSplit("copy", 0.0)
        else:
            label, policy, prefetch, misses = VARIANTS[base]
            offload = OffloadConfig(
                cache_policy=policy,
                prefetch=prefetch,
                misses=misses,
                kernel="torch" if "dequant" in flags else "auto",
                decode="graph" if "graph" in flags else "host",
            )
            layers = install_offloaded_experts(
                model, experts, device, dtype, plan.slots_per_layer, offload, config, 0 if "norefill" in flags else None
            )
            caches, split = layers.caches, layers.miss_split
            fused = any(m.uses_fused_kernels for m in model.modules() if isinstance(m, OffloadedExperts))
            label += ", triton" if fused else ""
            label += (", graph decode" + (", no refills" if "norefill" in flags else "")) if "graph" in flags else ""
        routing = RoutingLog(len(experts_names))
        for layer_index, module_name in enumerate(experts_names):
            model.set_submodule(
                module_name, TimedExperts(model.get_submodule(module_name), clock, layer_index, routing)
            )
        if layers is not None and layers.graph_decode is not None:
            layers.graph_decode.on_routes = routing.add_step
        pacer = None
        h2d_gbps = variant_h2d_gbps(flags, args.h2d_gbps)
        if h2d_gbps and caches:  # one layer's experts may go at once; past that the bus's rate holds
            pacer = Pacer(TokenBucket(h2d_gbps * 1e9, burst_bytes=top_k * layout.row_bytes))
            caches[0].copier.pacer = pacer
            label += f", emulated {h2d_gbps:g} GB/s"
        if is_compiled:
            graphs = "nographs" not in flags
            label += ", compiled" if graphs else ", compiled, no graphs"
            if graphs not in compiled_by_graphs:
                configure_compiler(config.num_hidden_layers, None)
                compiled_by_graphs[graphs] = CompiledDecode(model, 16 + max(args.tokens, 16) + 1, cuda_graphs=graphs)
            compiled = compiled_by_graphs[graphs]
            compiled.attach(layers)  # this variant's experts
            torch._dynamo.utils.counters.clear()  # what the JSON says this variant compiled
        # Warm-up, which also fills the cache and compiles. On an H200 the first variant ran 40% slower than the
        # same one repeated after a 4-token warm-up (4.35 against 7.04 tok/s), so the first gets a longer one.
        if device.type == "cuda":  # the peaks cover the warm-up: compiling and recording take memory too
            torch.cuda.reset_peak_memory_stats(device)
        if watch is not None:
            watch.nvml_peak = 0
        sample = watch.sample if watch is not None else None
        warm_up_started = time.perf_counter()
        decode_run(
            model, config, device, 16 if index == 0 or is_compiled else 4, clock, compiled=compiled, on_token=sample
        )
        warm_up_s = time.perf_counter() - warm_up_started

        # Counters and routes of the decode steps only: the prompts' copies would inflate GB/s and hit rate.
        window = DecodeWindow(caches, routing, schedule)
        runs = []
        for _ in range(args.prompts):
            runs.append(
                decode_run(
                    model,
                    config,
                    device,
                    args.tokens,
                    clock,
                    on_prefill_done=window.open,
                    compiled=compiled,
                    on_token=sample,
                )
            )
            window.close()
        run = dict(runs[len(runs) // 2])  # the per-layer times: one prompt's, the middle one
        decode_seconds = sum(r["decode_seconds"] for r in runs)
        stats = window.counters
        run.update(
            label=label,
            tok_per_s=statistics.median(r["tok_per_s"] for r in runs),
            tok_per_s_prompts=[r["tok_per_s"] for r in runs],
            decode_tokens=sum(r["decode_tokens"] for r in runs),
            decode_seconds=decode_seconds,
            expert_ms_per_token=statistics.median(r["expert_ms_per_token"] for r in runs),
            expert_kernel="triton" if fused else "dequantize",
            hit_rate=stats.hit_rate,
            cache=stats.model_dump(),
            miss_split=asdict(split),
            warm_up_s=warm_up_s,
            copy_gb_per_s=stats.bytes_copied / decode_seconds / 1e9,
            bus_gb_per_s=stats.bytes_over_bus / decode_seconds / 1e9,
            bus_bytes_per_token=stats.bytes_over_bus / max(1, sum(r["decode_tokens"] for r in runs)),
            gpu_peak_gb=torch.cuda.max_memory_allocated(device) / _GIB if device.type == "cuda" else None,
            memory=watch.report() if watch is not None else None,
            routing=(lambda r: r.as_dict() if r else None)(routing_stats(routing.per_layer(), plan.slots_per_layer)),
            replay=window.replay_report(),
            emulated=(
                {
                    "h2d_gbps": h2d_gbps,
                    "achieved_h2d_gb_per_s": stats.bytes_over_bus / decode_seconds / 1e9,
                    "paced_wait_s": pacer.waited_s,
                }
                if pacer is not None
                else None
            ),
        )
        report["cpu_expert_ms"] = report["cpu_expert_ms"] or split.cpu_ms
        if is_compiled:  # did every layer compile, and into how many graphs
            counters = torch._dynamo.utils.counters
            run["dynamo"] = {
                "unique_graphs": counters["stats"]["unique_graphs"],
                "graph_breaks": sum(counters["graph_break"].values()),
                "frames": dict(counters["frames"]),
            }
        print(f"# {label}: {run['tok_per_s']:.2f} tok/s, hit rate {stats.hit_rate:.1%}, warm-up {warm_up_s:.0f} s")
        routed = routing_stats(routing.per_layer(), plan.slots_per_layer)
        if routed:
            print(f"#   routing: {routed.describe()}")
        print(
            f"#   bus: {run['bus_bytes_per_token'] / 2**20:.1f} MiB a token over the bus "
            f"({run['bus_gb_per_s']:.2f} GB/s), {stats.bytes_copied_on_device / 2**20:.1f} MiB refilled on the device"
        )
        if pacer is not None:
            print(f"#   emulated {h2d_gbps:g} GB/s: achieved {run['emulated']['achieved_h2d_gb_per_s']:.2f} GB/s")
        if watch is not None:
            print(f"#   memory: {watch.describe()}")
        if run["replay"] is not None and not run["replay"]["matched"]:
            print("#   REPLAY MISMATCH: the routed ids differ from the recorded ones")
        if index == 0 and args.profile:
            _profile_host(model, config, device, args.profile, clock, out.with_suffix(".profile.txt"), compiled)
        return run

    for index, name in enumerate(args.variants.split(",")):
        try:
            report["variants"].append(measure(index, name))
        except Exception as error:  # a variant that fails (a compile error, say) leaves the others measured
            traceback.print_exc()
            report["failed"].append({"variant": name, "error": repr(error)})
        if report["variants"]:
            report["non_expert_ms_per_token"] = measured_dense_ms(report)
        out.write_text(json.dumps(report, indent=2))

    if args.ttft:  # through the last variant's experts (the prompt takes the host path in every variant)
        report["ttft"] = {"experts": report["variants"][-1]["label"] if report["variants"] else None, "runs": []}
        for length in (int(n) for n in args.ttft.split(",")):
            try:
                ms = prompt_ms(model, config, device, length)
                report["ttft"]["runs"].append({"prompt_tokens": length, "ms": ms})
                print(f"# time to first token, {length}-token prompt: {ms:.0f} ms")
            except Exception as error:  # out of memory at the longest, say: the shorter ones stand
                traceback.print_exc()
                report["failed"].append({"variant": f"ttft {length}", "error": repr(error)})
            out.write_text(json.dumps(report, indent=2))

    if args.skip_naive:
        _print_table(report)
        return _check_memory(report)
    naive_layers = min(args.naive_layers, len(experts_names))
    free_experts()  # the naive path needs a whole layer's room
    naive_layer_s = naive_layer_seconds(
        layout, host_rows, device, dtype, config.num_experts_per_tok, act_fn, clock, naive_layers, tokens=2
    )
    # the rest of the model's time per token; where no run timed its experts apart, a whole step's (at most that)
    non_expert_ms = report["non_expert_ms_per_token"]
    if non_expert_ms is None:
        non_expert_ms = min(1000 / run["tok_per_s"] for run in report["variants"])
    non_expert_s = non_expert_ms / 1000
    report["naive"] = {
        "tok_per_s": 1 / (non_expert_s + naive_layer_s * len(experts_names)),
        "layer_ms": naive_layer_s * 1000,
        "note": f"timed on {naive_layers} layers x 2 tokens, scaled to {len(experts_names)} layers",
    }
    report["complete"] = True
    _print_table(report)
    out.write_text(json.dumps(report, indent=2))
    print(f"# wrote {out}")
    return _check_memory(report)


def prompt_ms(model, config, device, tokens: int) -> float:
    """Time to first token of a random `tokens`-token prompt: its forward, eager, to the first token's id."""
    prompt = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    started = time.perf_counter()
    with torch.inference_mode():
        model(prompt, logits_to_keep=1).logits.argmax(-1).tolist()
    return (time.perf_counter() - started) * 1000


def _check_memory(report: dict) -> dict:
    """Fail loudly where a variant held more device memory, as NVML counts it, than the budget allows."""
    over = [run for run in report["variants"] if run["memory"] and run["memory"]["over_budget"]]
    for run in over:
        print(
            f"# OVER BUDGET {run['label']}: NVML peak {run['memory']['nvml_peak_gib']:.2f} GiB > "
            f"{run['memory']['limit_gib']:.2f} GiB (allocator peak {run['memory']['allocator_peak_gib']:.2f} GiB)"
        )
    if over:
        raise OverBudgetError(f"{len(over)} variant(s) over the device memory budget: see above")
    return report


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _print_table(report: dict) -> None:
    for failure in report["failed"]:
        print(f"# FAILED {failure['variant']}: {failure['error']}")
    if not report["variants"]:
        return
    print(
        f"\nslots/layer {report['slots_per_layer']}, resident {report['resident_gb']:.2f} GB, "
        f"H2D {report['h2d_gb_per_s']:.1f} GB/s, expert copy {report['expert_copy_ms']:.3f} ms, "
        f"expert compute {report['expert_compute_ms']:.3f} ms, "
        f"non-expert {_ms(report['non_expert_ms_per_token'])} ms/token"
    )
    print(
        f"| {'engine':<44} | {'decode tok/s':>12} | {'hit rate':>8} | {'CPU share':>9} | {'copy GB/s':>9} | "
        f"{'experts ms/tok':>14} |"
    )
    print(f"|{'-' * 46}|{'-' * 14}|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 16}|")
    for run in report["variants"]:
        cache = run["cache"]
        cpu_share = cache["computed_on_host"] / cache["misses"] if cache["misses"] else 0.0
        print(
            f"| {run['label']:<44} | {run['tok_per_s']:>12.2f} | {run['hit_rate']:>8.1%} | {cpu_share:>9.1%} | "
            f"{run['copy_gb_per_s']:>9.2f} | {run['expert_ms_per_token']:>14.1f} |"
            + (" emulated" if run.get("emulated") else "")
        )
        if run["miss_split"]["cpu_ms"] is not None:
            split = run["miss_split"]
            print(
                f"#   {run['label']}: timed at load: expert copy {split['copy_ms']:.3f} ms, CPU expert "
                f"{split['cpu_ms']:.3f} ms -> {split['cpu_share']:.1%} of misses to the CPU"
            )
    layer_types = report["variants"][0]["layer_types"]
    naive = report["naive"]
    if naive:
        print(
            f"| {'naive whole-layer':<44} | {naive['tok_per_s']:>12.2f} | {'-':>8} | {'-':>9} | {'-':>9} | "
            f"{naive['layer_ms'] * len(layer_types):>14.1f} |  ({naive['note']})"
        )
    timed = next((run for run in report["variants"] if run["layer_ms"]), None)
    for kind in sorted(set(layer_types)) if timed else []:
        times = [t for t, k in zip(timed["layer_ms"], layer_types, strict=True) if k == kind]
        print(f"# {kind}: {len(times)} layers, {sum(times) / len(times):.2f} ms per layer per token ({timed['label']})")


if __name__ == "__main__":
    main()
