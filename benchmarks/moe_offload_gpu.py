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
import time
import traceback
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from transformers import Qwen3NextConfig
from transformers.activations import ACT2FN

from benchmarks.moe_cost_model import measured_dense_ms
from shared.schemas import ExpertCacheCounters
from worker.engine.compiled_decode import CompiledDecode, configure_compiler
from worker.engine.moe_offload.budget import plan_memory
from worker.engine.moe_offload.builder import fused_decode_kernels, install_offloaded_experts
from worker.engine.moe_offload.checkpoint import build_skeleton, find_fused_experts
from worker.engine.moe_offload.config import OffloadConfig
from worker.engine.moe_offload.cpu_experts import MissSplit
from worker.engine.moe_offload.offloaded_experts import OffloadedExperts, mix_decode
from worker.engine.moe_offload.packing import ExpertLayout, pack_expert, unpack_experts
from worker.engine.moe_offload.pinning import pin_in_place

RESULTS = Path(__file__).parent / "results"
_GIB = 1024**3

REAL_SHAPES = dict(
    vocab_size=151_936,
    hidden_size=2048,
    intermediate_size=5120,
    num_hidden_layers=48,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=256,
    partial_rotary_factor=0.25,
    linear_num_value_heads=32,
    linear_num_key_heads=16,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    num_experts=512,
    num_experts_per_tok=10,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=512,
    full_attention_interval=4,
    norm_topk_prob=True,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)
SMOKE_SHAPES = dict(
    REAL_SHAPES,
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    head_dim=64,
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
)


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
    """Give every meta parameter random values on `device`: N(0, 0.02) matrices, neutral 1-D weights."""
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
            else:
                value.zero_()  # Qwen3-Next's norms scale by (1 + weight)
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

    def __init__(self, inner: torch.nn.Module, clock: Clock):
        super().__init__()
        self.inner = inner
        self.clock = clock
        self.marks: list[list] = []

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if torch.compiler.is_compiling() and getattr(self.inner, "graph_decode", None) is not None:
            return self.inner(hidden_states, top_k_index, top_k_weights)  # inside the step's one graph
        return self._timed(hidden_states, top_k_index, top_k_weights)

    @torch.compiler.disable
    def _timed(self, hidden_states, top_k_index, top_k_weights):
        start = self.clock.mark()
        output = self.inner(hidden_states, top_k_index, top_k_weights)
        self.marks.append([start, self.clock.mark()])
        return output


def decode_run(
    model, config, device, tokens: int, clock: Clock, on_prefill_done=None, compiled: CompiledDecode | None = None
) -> dict:
    """Greedy decode of `tokens` tokens after a 16-token prompt, with the experts' device time (`TimedExperts`
    installed) and, in eager mode, each layer's (hooks; a compiled decode has no layer boundaries to time).
    `on_prefill_done` runs once the prompt's forward is over, before the first decode step."""
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
    parser.add_argument("--reserve-gb", type=float, default=1.5)
    parser.add_argument("--tokens", type=int, default=48, help="decode tokens per variant")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--naive-layers", type=int, default=4, help="layers timed for the naive baseline")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on a CPU")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, in order, repeats allowed: {', '.join(VARIANTS)}, no-experts "
        "(experts output zeros: the rest of the model alone); each may add :compiled, "
        ":nographs, :dequant, :graph, :norefill",
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
        if name.split(":")[0] not in known or not set(name.split(":")[1:]) <= set(FLAGS)
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

    plan = plan_memory(
        device_budget_gb=args.budget_gb,
        reserve_gb=args.reserve_gb,
        host_budget_gb=0,
        resident_bytes=resident_bytes,
        num_layers=len(experts_names),
        experts_per_layer=config.num_experts,
        row_bytes=layout.row_bytes,
        top_k=config.num_experts_per_tok,
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
    act_fn = ACT2FN[config.hidden_act]
    bandwidth = measure_bandwidth(device, 256 * 1024 * 1024 if not args.smoke else 8 * 1024 * 1024, clock)
    on_device = host_rows[0][: config.num_experts_per_tok].to(device)
    top_k = config.num_experts_per_tok
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
        "smoke": args.smoke,
        "complete": False,
        "shapes": shapes,
        "quant": args.quant,
        "row_bytes": layout.row_bytes,
        "slots_per_layer": plan.slots_per_layer,
        "resident_gb": resident_bytes / _GIB,
        "h2d_gb_per_s": bandwidth,
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
                _env_file=None,
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
        for module_name in experts_names:
            model.set_submodule(module_name, TimedExperts(model.get_submodule(module_name), clock))
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
        warm_up_started = time.perf_counter()
        decode_run(model, config, device, 16 if index == 0 or is_compiled else 4, clock, compiled=compiled)
        warm_up_s = time.perf_counter() - warm_up_started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def decode_only():  # the prompt's copies would inflate decode GB/s and hit rate
            for cache in caches:
                cache.stats = ExpertCacheCounters()

        run = decode_run(model, config, device, args.tokens, clock, on_prefill_done=decode_only, compiled=compiled)
        stats = ExpertCacheCounters.total(cache.stats for cache in caches)
        run.update(
            label=label,
            expert_kernel="triton" if fused else "dequantize",
            hit_rate=stats.hit_rate,
            cache=stats.model_dump(),
            miss_split=asdict(split),
            warm_up_s=warm_up_s,
            copy_gb_per_s=stats.bytes_copied / run["decode_seconds"] / 1e9,
            gpu_peak_gb=torch.cuda.max_memory_allocated(device) / _GIB if device.type == "cuda" else None,
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

    if args.skip_naive:
        _print_table(report)
        return report
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
