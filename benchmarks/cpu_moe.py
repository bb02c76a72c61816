"""Qwen3-Next-80B-A3B's real shapes on the CPU, cut to a few layers: our engine's CPU path beside llama.cpp.

The same random-weight model at each depth (`--layers`, 4 and 8 by default: all 48 need 45 GB), built the way
`moe_offload_gpu` builds it: transformers' Qwen3NextForCausalLM with every routed expert a 4-bit row in host RAM
(NF4, 4.5 bits per weight) behind `OffloadedExperts`, all of them in place (the CPU tier). Variants, each in
its own process, rounds interleaved:

  today      the experts dequantized, then multiplied; the dense layers in float32 (the baseline)
  ours       every routed expert through the in-place 4-bit kernel; the dense layers on the int4/q8 kernels;
             a DeltaNet layer's decode between its projections as one op; the MoE block's shared expert's
             three input projections as one call
  ours-compiled  the same, its decode step compiled as the engine compiles it (`CompiledDecode`: inductor over a
             static cache, through transformers' `generate`, tokens timed as they stream out)
  llama.cpp  `llama-cpp-python` on a synthetic GGUF of the same shapes and depth (`synthetic_gguf`: experts
             Q4_K, 4.5 bits per weight; output Q6_K), where it is installed (`pip install '.[bench-llama]'`)

Per variant and depth: time to prefill `--prompt` tokens, then `--tokens` single-token decode steps (median of
the steps, each round); peak RSS. Per layer: the difference between two depths over the layers between them,
which cancels the embedding, the output matrix and fixed costs. Each decode figure is also set against its
bandwidth floor: the bytes a decode step reads per layer (`layer_read_bytes`, from each variant's own weights)
at the copy bandwidth measured in the same run (before and after the variants; the better of the two). `today`
runs at the smallest depth only, alone (it is slow, and its prefill dequantizes every expert to float32: 10 GB
at 4 layers, which does not fit beside the others).

    python -m benchmarks.cpu_moe                  # today, ours, llama.cpp: ~15 minutes on 2 cores
    python -m benchmarks.cpu_moe --variants ours-compiled,llama.cpp --out ...   # ~15 minutes more
    python -m benchmarks.cpu_moe --smoke          # tiny shapes, seconds: checks the script runs
"""

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.cpu_decode import median_and_range

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("today", "ours", "ours-compiled", "llama.cpp")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def build_cpu_model(shapes: dict, layers: int, variant: str):
    """The random-weight model at `layers` deep, its experts 4-bit rows in place, dense layers per `variant`."""
    import torch
    from transformers import Qwen3NextConfig

    from benchmarks.moe_offload_gpu import materialize_random, synthetic_host_rows
    from worker.engine.cpu_quant.kernels import kernels_available
    from worker.engine.cpu_quant.model import quantize_linears
    from worker.engine.moe_offload.builder import install_offloaded_experts
    from worker.engine.moe_offload.checkpoint import build_skeleton, find_fused_experts
    from worker.engine.moe_offload.config import OffloadConfig
    from worker.engine.moe_offload.cpu_moe_block import install_cpu_moe_blocks
    from worker.engine.moe_offload.delta_rule import install_fused_delta_rule
    from worker.engine.moe_offload.packing import ExpertLayout

    config = Qwen3NextConfig(**dict(shapes, num_hidden_layers=layers))
    model = build_skeleton(config, torch.float32)
    names = list(find_fused_experts(model))
    for name in names:  # drop the 3D expert parameters before materializing the rest
        model.set_submodule(name, torch.nn.Identity())
    materialize_random(model, torch.device("cpu"), torch.float32)
    layout = ExpertLayout(config.hidden_size, config.moe_intermediate_size, "nf4")
    rows = synthetic_host_rows(layout, len(names), config.num_experts, pin=False)
    experts = [(name, layout, layer_rows) for name, layer_rows in zip(names, rows, strict=True)]
    offloaded = install_offloaded_experts(
        model, experts, torch.device("cpu"), torch.float32, config.num_experts, OffloadConfig(), config
    )
    if variant == "today":  # ours-compiled: built as ours
        for module in offloaded.modules:
            module.in_place_kernel = None
    else:
        if not kernels_available() or not install_fused_delta_rule():
            raise RuntimeError("the CPU kernels (int4 linear, fused DeltaNet step) do not build here")
        quantize_linears(model)
        install_cpu_moe_blocks(model)
    return model.eval(), config, layout


def delta_state_traffic(shapes: dict) -> int:
    """A DeltaNet layer's float32 recurrent state [value heads, key dim, value dim], read and written once a
    decode step."""
    return 2 * shapes["linear_num_value_heads"] * shapes["linear_key_head_dim"] * shapes["linear_value_head_dim"] * 4


def layer_read_bytes(model, config, layout) -> dict[str, int]:
    """Bytes one decode step reads per layer, by layer type: its dense weights and router as stored, top-k
    expert rows, and the recurrent state (read and written) of a DeltaNet layer."""
    state = delta_state_traffic(config.to_dict())
    per_type: dict[str, int] = {}
    for layer in model.model.layers:
        dense = sum(t.numel() * t.element_size() for t in layer.buffers())
        dense += sum(p.numel() * p.element_size() for p in layer.parameters())
        kind = "linear_attention" if hasattr(layer, "linear_attn") else "full_attention"
        total = dense + config.num_experts_per_tok * layout.row_bytes
        if kind == "linear_attention":
            total += state
        per_type.setdefault(kind, total)
    return per_type


def _compiled_runner(model, config, prompt_length: int, tokens: int):
    """`generate` with the decode step compiled (the engine's `CompiledDecode`), compiled here once; returns a
    function (prompt ids, tokens) -> (prefill seconds, decode step seconds)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from worker.engine.compiled_decode import CompiledDecode, configure_compiler

    configure_compiler(config.num_hidden_layers, None)
    compiled = CompiledDecode(model, [prompt_length + tokens + 8])

    class Arrivals(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(prompt_ids: list[int], count: int) -> tuple[float, list[float]]:
        ids = torch.tensor([prompt_ids])
        arrivals = Arrivals()
        started = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=count + 1,
            min_new_tokens=count + 1,
            do_sample=False,
            streamer=arrivals,
            **compiled.generate_kwargs(len(prompt_ids) + count + 1),
        )
        times = arrivals.times[1:]  # the first put is the prompt; then the first token, after the prefill
        return times[0] - started, [later - earlier for earlier, later in zip(times, times[1:], strict=False)]

    with torch.inference_mode():
        compiled.warm_up(model.generate, torch.full((1, prompt_length), 5), pad_token_id=0)
    return run


def _ours_process(variant: str, shapes: dict, layers: int, threads: int, connection) -> None:
    import warnings

    import torch
    from transformers import DynamicCache

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' rename of past_key_values
    torch.set_num_threads(threads)
    started = time.perf_counter()
    model, config, layout = build_cpu_model(shapes, layers, variant)
    compiled = _compiled_runner(model, config, *connection.recv()) if variant == "ours-compiled" else None
    connection.send({"load_s": time.perf_counter() - started, "read_bytes": layer_read_bytes(model, config, layout)})
    while (request := connection.recv()) is not None:
        prompt_ids, tokens = request
        if compiled is not None:
            with torch.inference_mode():
                prefill_s, steps = compiled(prompt_ids, tokens)
            connection.send({"prefill_s": prefill_s, "step_s": steps, "peak_rss_gb": _peak_rss_gb()})
            continue
        with torch.inference_mode():
            cache = DynamicCache(config=config)
            begin = time.perf_counter()
            # logits for the last position only, as generate (and llama.cpp) computes them
            model(input_ids=torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            prefill_s = time.perf_counter() - begin
            steps = []
            for index in range(tokens):  # as llama.cpp's process: the prompt's tokens again
                token = torch.tensor([[prompt_ids[index % len(prompt_ids)]]])
                begin = time.perf_counter()
                model(input_ids=token, past_key_values=cache, use_cache=True)
                steps.append(time.perf_counter() - begin)
        connection.send({"prefill_s": prefill_s, "step_s": steps, "peak_rss_gb": _peak_rss_gb()})


def synthetic_gguf_path(folder: Path, shapes: dict, layers: int) -> Path:
    """The peer's model at `layers` deep, written once into `folder` (on disk: its pages are the page cache's,
    which the kernel can drop, not memory a process holds) and reused by later runs."""
    from benchmarks.synthetic_gguf import write_synthetic_gguf

    name = "smoke" if shapes["hidden_size"] < 2048 else "real"
    path = folder / f"qwen3next-{name}-{layers}-layers.gguf"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        write_synthetic_gguf(partial, shapes, layers)
        partial.rename(path)
    return path


def _llama_process(gguf: Path, threads: int, connection) -> None:
    try:
        import llama_cpp
    except ImportError as error:
        connection.send({"error": f"{error}"})
        return
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
    )
    connection.send(
        {
            "load_s": time.perf_counter() - started,
            "build": f"llama-cpp-python {llama_cpp.__version__}",
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        }
    )
    while (request := connection.recv()) is not None:
        prompt_ids, tokens = request
        llm.reset()
        begin = time.perf_counter()
        llm.eval(prompt_ids)
        prefill_s = time.perf_counter() - begin
        steps = []
        for index in range(tokens):  # the prompt's tokens again: what is fed does not change the work
            begin = time.perf_counter()
            llm.eval([prompt_ids[index % len(prompt_ids)]])
            steps.append(time.perf_counter() - begin)
        connection.send({"prefill_s": prefill_s, "step_s": steps, "peak_rss_gb": _peak_rss_gb()})


def copy_bandwidth_gbps(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory traffic of a large copy (bytes read + bytes written, per second), the best of `repeats`."""
    import torch

    torch.set_num_threads(threads)
    source = torch.ones(nbytes // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - begin)
    return 2 * nbytes / best / 1e9


def _start(variant: str, shapes: dict, layers: int, args):
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    threads = args.threads
    if variant == "llama.cpp":
        # Written by a process of its own, whose memory is gone before the variants load.
        writer = context.Process(target=synthetic_gguf_path, args=(args.gguf_dir, shapes, layers))
        writer.start()
        writer.join()
        gguf = synthetic_gguf_path(args.gguf_dir, shapes, layers)
        process = context.Process(target=_llama_process, args=(gguf, threads, child))
    else:
        process = context.Process(target=_ours_process, args=(variant, shapes, layers, threads, child))
    process.start()
    if variant == "ours-compiled":  # it compiles for these lengths before it says it is ready
        parent.send((args.prompt, args.tokens))
    return process, parent


def measure_depth(variants: list[str], shapes: dict, layers: int, args) -> dict[str, dict]:
    """Every variant's process at `layers` deep, loaded, then the rounds interleaved across them."""
    import random

    running, results = {}, {}
    for variant in variants:
        process, connection = _start(variant, shapes, layers, args)
        hello = connection.recv()
        if "error" in hello:
            print(f"# {variant} at {layers} layers skipped: {hello['error']}")
            process.join()
            continue
        running[variant] = (process, connection)
        results[variant] = dict(hello, rounds=[])
        print(f"# {variant} at {layers} layers loaded in {hello['load_s']:.0f} s")
    rng = random.Random(layers)
    for round_index in range(args.rounds):
        prompt = [rng.randrange(3, shapes["vocab_size"]) for _ in range(args.prompt)]
        order = list(running) if round_index % 2 == 0 else list(reversed(running))
        for variant in order:
            connection = running[variant][1]
            connection.send((prompt, args.tokens))
            results[variant]["rounds"].append(connection.recv())
    for process, connection in running.values():
        connection.send(None)
        process.join()
    for result in results.values():
        rounds = result.pop("rounds")
        result["decode_ms"] = median_and_range([statistics.median(r["step_s"]) * 1000 for r in rounds])
        result["prefill_tok_per_s"] = median_and_range([args.prompt / r["prefill_s"] for r in rounds])
        result["peak_rss_gb"] = max(r["peak_rss_gb"] for r in rounds)
    return results


def peer_read_bytes(shapes: dict) -> dict[str, int]:
    """The bytes llama.cpp's decode step reads per layer of the synthetic GGUF, by layer type: every tensor of
    the layer, the expert tensors at top-k of the experts, plus the DeltaNet state as ours."""
    from benchmarks.synthetic_gguf import is_recurrent, tensor_specs

    per_layer: dict[int, int] = {}
    for spec in tensor_specs(shapes, 2 * shapes["full_attention_interval"]):
        if not spec.name.startswith("blk."):
            continue
        layer = int(spec.name.split(".")[1])
        share = shapes["num_experts_per_tok"] / shapes["num_experts"] if "_exps" in spec.name else 1.0
        per_layer[layer] = per_layer.get(layer, 0) + int(spec.nbytes * share)
    state = delta_state_traffic(shapes)
    per_type: dict[str, int] = {}
    for layer, nbytes in sorted(per_layer.items()):
        recurrent = is_recurrent(layer, shapes["full_attention_interval"])
        per_type.setdefault("linear_attention" if recurrent else "full_attention", nbytes + (state if recurrent else 0))
    return per_type


def mean_layer_bytes(per_type: dict[str, int], shapes: dict) -> float:
    """The average over a model's layers: one in `full_attention_interval` is an attention layer."""
    interval = shapes["full_attention_interval"]
    return ((interval - 1) * per_type["linear_attention"] + per_type["full_attention"]) / interval


#: What a large copy moves per second (read + write) on a typical 64 GB desktop, dual-channel DDR5: an assumption
#: for the labelled estimate, not a measurement.
DESKTOP_COPY_GBPS = 60.0


def report(
    by_depth: dict[int, dict[str, dict]], shapes: dict, bandwidth: float, desktop_gbps: float = DESKTOP_COPY_GBPS
) -> dict:
    """Per variant: per-layer figures from the two extreme depths, bandwidth floors, the full depth extrapolated
    from the per-layer cost, and that scaled to a desktop's memory (an estimate: same share of the floor)."""
    depths = sorted(by_depth)
    low, high = depths[0], depths[-1]
    table: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        rows = {depth: by_depth[depth][variant] for depth in depths if variant in by_depth[depth]}
        if not rows:
            continue
        entry: dict[str, Any] = {"by_depth": rows}
        if low in rows and high in rows and high > low:
            entry["decode_ms_per_layer"] = (rows[high]["decode_ms"]["median"] - rows[low]["decode_ms"]["median"]) / (
                high - low
            )
            token_layers = 1 / rows[high]["prefill_tok_per_s"]["median"] - 1 / rows[low]["prefill_tok_per_s"]["median"]
            entry["prefill_ms_per_token_layer"] = token_layers * 1000 / (high - low)
        read = peer_read_bytes(shapes) if variant == "llama.cpp" else rows[low].get("read_bytes")
        if read:
            entry["layer_read_mb"] = mean_layer_bytes(read, shapes) / 1e6
            entry["floor_ms_per_layer"] = mean_layer_bytes(read, shapes) / (bandwidth * 1e9) * 1000
            if "decode_ms_per_layer" in entry and entry["decode_ms_per_layer"] > 0:
                entry["share_of_bandwidth_floor"] = entry["floor_ms_per_layer"] / entry["decode_ms_per_layer"]
        table[variant] = entry
    result: dict[str, Any] = {"variants": table}
    ours, peer = table.get("ours", {}), table.get("llama.cpp", {})
    if "decode_ms_per_layer" in ours:
        result["decode_share_of_bandwidth_floor"] = ours.get("share_of_bandwidth_floor")
    if "decode_ms_per_layer" in ours and "decode_ms_per_layer" in peer:
        result["decode_layer_speedup_vs_best_peer"] = peer["decode_ms_per_layer"] / ours["decode_ms_per_layer"]
        result["prefill_ratio_vs_best_peer"] = peer["prefill_ms_per_token_layer"] / ours["prefill_ms_per_token_layer"]
    full = shapes["num_hidden_layers"]
    for entry in table.values():
        if "decode_ms_per_layer" in entry:  # extrapolated: the fixed part measured at the smallest depth
            fixed = entry["by_depth"][low]["decode_ms"]["median"] - low * entry["decode_ms_per_layer"]
            entry["full_depth_decode_ms_extrapolated"] = fixed + full * entry["decode_ms_per_layer"]
            entry["desktop_full_depth_decode_ms_estimated"] = (
                entry["full_depth_decode_ms_extrapolated"] * bandwidth / desktop_gbps
            )
    result["desktop_estimate_assumes"] = (
        f"{desktop_gbps:g} GB/s copy traffic (dual-channel DDR5) and the share of the bandwidth floor reached here"
    )
    return result


def _format(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_table(result: dict, depths: list[int]) -> None:
    print(
        f"\n| variant | {' | '.join(f'decode ms/token @{d}' for d in depths)} | ms/layer | floor ms/layer | "
        f"share of floor | prefill ms/token-layer | peak RSS GB @{depths[-1]} |"
    )
    print("|---" * (len(depths) + 6) + "|")
    for variant, entry in result["variants"].items():
        cells = []
        for depth in depths:
            row = entry["by_depth"].get(depth)
            cells.append(
                f"{row['decode_ms']['median']:.1f} ({row['decode_ms']['min']:.1f}-{row['decode_ms']['max']:.1f})"
                if row
                else "-"
            )
        last = entry["by_depth"].get(depths[-1]) or entry["by_depth"][depths[0]]
        figures = [
            _format(entry.get(key), spec)
            for key, spec in (
                ("decode_ms_per_layer", ".2f"),
                ("floor_ms_per_layer", ".2f"),
                ("share_of_bandwidth_floor", ".0%"),
                ("prefill_ms_per_token_layer", ".2f"),
            )
        ]
        print(f"| {variant} | {' | '.join(cells + figures)} | {last['peak_rss_gb']:.1f} |")
    for variant, entry in result["variants"].items():
        if "full_depth_decode_ms_extrapolated" in entry:
            full, desktop = entry["full_depth_decode_ms_extrapolated"], entry["desktop_full_depth_decode_ms_estimated"]
            print(
                f"{variant}: full depth extrapolated {full:.0f} ms/token ({1000 / full:.1f} tok/s); "
                f"desktop estimate {desktop:.0f} ms/token ({1000 / desktop:.1f} tok/s)"
            )
    print(f"(desktop estimate assumes {result['desktop_estimate_assumes']})")
    for key in ("decode_layer_speedup_vs_best_peer", "decode_share_of_bandwidth_floor", "prefill_ratio_vs_best_peer"):
        if result.get(key) is not None:
            print(f"{key}: {result[key]:.3f}")


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.model_shapes import REAL_SHAPES, SMOKE_SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="4,8", help="depths, comma-separated (at least two for per-layer)")
    parser.add_argument(
        "--variants",
        default="today,ours,llama.cpp",
        help=f"comma-separated, of {', '.join(VARIANTS)}; at 8 layers ours and ours-compiled do not fit in 24 GB "
        "beside each other and the peer: run ours-compiled,llama.cpp apart",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps per round")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes")
    parser.add_argument(
        "--apart-from",
        type=int,
        default=None,
        metavar="LAYERS",
        help="from this depth on, each variant loads and runs its rounds alone (not interleaved): at 8 layers ours "
        "and llama.cpp (which maps its GGUF and repacks its experts) together need more than 24 GB, and a peer "
        "whose pages are evicted reads them back from disk at every token",
    )
    parser.add_argument(
        "--gguf-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "moeserve-cpu-moe",
        help="where the peer's synthetic GGUFs are written once and kept (4.2 GB at 4 layers, 8.3 GB at 8)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else REAL_SHAPES
    depths = sorted(int(d) for d in args.layers.split(","))
    if depths[0] < shapes["full_attention_interval"]:
        parser.error(f"each depth needs an attention layer: at least {shapes['full_attention_interval']} layers")
    wanted = [v for v in args.variants.split(",") if v]
    unknown = set(wanted) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    bandwidths = [copy_bandwidth_gbps(args.threads)]
    cpu = platform.processor() or platform.machine()
    print(f"# {cpu}, {args.threads} threads; copy bandwidth {bandwidths[0]:.1f} GB/s (read + write)")
    by_depth: dict[int, dict[str, dict]] = {depth: {} for depth in depths}
    if "today" in wanted:  # alone: its float prefill does not fit in RAM beside the others
        by_depth[depths[0]].update(measure_depth(["today"], shapes, depths[0], args))
    for depth in depths:
        together = [v for v in wanted if v != "today"]
        groups = [[v] for v in together] if args.apart_from is not None and depth >= args.apart_from else [together]
        for group in groups:
            by_depth[depth].update(measure_depth(group, shapes, depth, args))
    # Measured again at the end: a shared host's memory is busier at some moments than others, and the floor
    # is what the machine can do, so the better of the two is taken.
    bandwidths.append(copy_bandwidth_gbps(args.threads))
    bandwidth = max(bandwidths)
    print(f"# copy bandwidth at the end {bandwidths[-1]:.1f} GB/s; the floors use {bandwidth:.1f}")
    result = report(by_depth, shapes, bandwidth)
    result.update(
        cpu=cpu,
        threads=args.threads,
        copy_bandwidth_gbps=bandwidth,
        copy_bandwidth_samples_gbps=bandwidths,
        shapes="smoke" if args.smoke else "Qwen3-Next-80B-A3B",
        depths=depths,
        prompt_tokens=args.prompt,
        decode_tokens=args.tokens,
        rounds=args.rounds,
        apart_from_depth=args.apart_from,
        quant={
            "ours": "experts NF4 (4.5 bits), dense q4 (32-blocks), lm_head q8",
            "today": "experts NF4, dense fp32",
            "llama.cpp": "experts Q4_K (4.5 bits), output Q6_K, small tensors F32",
        },
    )
    _print_table(result, depths)
    out = args.out or RESULTS / f"cpu_moe-{'smoke' if args.smoke else 'real'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# wrote {out}")
    return result


if __name__ == "__main__":
    main()
