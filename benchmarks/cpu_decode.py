"""The bundled model on the CPU, three ways in one run: the float path, the fast path, llama.cpp.

  a. float: the engine with float32 weights, decoding eagerly (CPU_WEIGHTS=float, DECODE_COMPILE=off)
  b. fast:  the engine's CPU default (4-bit linear layers on AVX2 kernels, the decode step compiled)
  c. llama.cpp: `llama-cpp-python` on the same GGUF the bundled model comes from, where it is installed
     (`pip install '.[bench-llama]'`: it builds llama.cpp from source, about 5 minutes)

Each runs in a process of its own (so its memory is its own), on the same threads, with the same prompt
token ids (the model's chat template), greedy, every answer forced to the same length. The variants take
turns, round by round, so that a noisy stretch of the machine hits each of them. Per variant: decode tok/s
(tokens after the first over the time after the first), time to first token, prefill tok/s of a long
prompt, load time and peak RSS; each the median and the spread over prompts x rounds. The text the fast
path and llama.cpp write is compared with the float path's (same text, common prefix).

    python -m benchmarks.cpu_decode                 # 2 threads, 3 prompts x 3 rounds x 64 tokens
    python -m benchmarks.cpu_decode --rounds 5 --tokens 128 --threads 1 --out /tmp/cpu_decode.json
"""

import argparse
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from benchmarks.cpu_experts import cpu_model, write_cpu_report

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "List some ideas for a rainy weekend, with a sentence on each.",
]
LONG_PROMPT_WORDS = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class _Timing:
    """A generation control that notes when each piece of text arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.text: list[str] = []

    def emit(self, text: str) -> None:
        self.times.append(time.perf_counter())
        self.text.append(text)

    def stop_reason(self) -> None:
        return None


def _engine_runner(weights: str, compile_decode: str) -> tuple[Callable[[list[int], int], dict], Any]:
    from shared.schemas import GenerationParams
    from worker.engine.transformers_engine import TransformersEngine
    from worker.model_store import resolve_model_path
    from worker.settings import get_engine_settings

    settings = get_engine_settings()
    config = settings.engine_config(resolve_model_path(settings))
    engine = TransformersEngine(
        replace(config, device="cpu", cpu_weights=weights, decode_compile=compile_decode)  # type: ignore[arg-type]
    )
    engine.load()
    tokenizer = engine.tokenizer

    def run(prompt_ids: list[int], tokens: int) -> dict:
        timing = _Timing()
        prompt = tokenizer.decode(prompt_ids)  # the template is already in the ids
        params = GenerationParams(
            prompt=prompt, max_tokens=tokens, min_tokens=tokens, temperature=0.0, apply_chat_template=False
        )
        started = time.perf_counter()
        outcome = engine.generate(params, timing)
        return _timed(started, timing.times, time.perf_counter(), outcome.tokens_generated, "".join(timing.text))

    return run, tokenizer


def _llama_cpp_runner(gguf: Path, threads: int) -> Callable[[list[int], int], dict]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
    )

    def run(prompt_ids: list[int], tokens: int) -> dict:
        times: list[float] = []
        pieces: list[bytes] = []
        started = time.perf_counter()
        # Greedy; the end-of-sequence token does not stop it, so every answer has `tokens` tokens.
        for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            pieces.append(llm.detokenize([token]))
            if len(times) == tokens:
                break
        return _timed(started, times, times[-1], len(times), b"".join(pieces).decode("utf-8", "replace"))

    return run


def _timed(started: float, arrivals: list[float], ended: float, tokens: int, text: str) -> dict:
    first = arrivals[0] if arrivals else ended
    decode_s = ended - first
    return {
        "first_token_ms": (first - started) * 1000,
        "decode_tok_per_s": (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else None,
        "tokens": tokens,
        "text": text,
    }


def _simd(variant: str) -> str:
    """What the variant's kernels were built for: llama.cpp's CPU features, or torch's CPU dispatch level."""
    if variant == "llama.cpp":
        import llama_cpp

        return llama_cpp.llama_print_system_info().decode().strip()
    import torch

    from worker.engine.cpu_quant.kernels import kernels_isa

    return f"torch {torch.backends.cpu.get_cpu_capability()}; int4 kernels {kernels_isa()}"


def _serve(variant: str, threads: int, gguf: str, connection) -> None:
    """A variant's process: load, answer (prompt_ids, tokens) requests until told to stop."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        if variant == "llama.cpp":
            run = _llama_cpp_runner(Path(gguf), threads)
        else:
            run, _ = _engine_runner(*(("float", "off") if variant == "float" else ("auto", "auto")))
    except Exception as error:  # llama-cpp-python missing or failing is a finding, not a crash
        connection.send({"error": f"{type(error).__name__}: {error}"})
        return
    connection.send({"load_s": time.perf_counter() - started, "rss_mb": _peak_rss_mb(), "simd": _simd(variant)})
    while (request := connection.recv()) is not None:
        result = run(*request)
        result["peak_rss_mb"], result["rss_mb"] = _peak_rss_mb(), _rss_mb()
        connection.send(result)


def median_and_range(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer (forced)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long-prompt", type=int, default=512, help="tokens of the prefill prompt (0: skip)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even where it is installed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from worker.model_store import bundled_gguf_path, resolve_model_path
    from worker.settings import get_engine_settings

    settings = get_engine_settings()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings))
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        for text in PROMPTS
    ]
    long_ids = tokenizer(LONG_PROMPT_WORDS * (args.long_prompt // 8 + 1))["input_ids"][: args.long_prompt]
    gguf = bundled_gguf_path(settings.model_cache_dir)

    variants = ["float", "fast"] + ([] if args.no_llama_cpp else ["llama.cpp"])
    context = multiprocessing.get_context("spawn")
    workers: dict[str, Any] = {}
    loads: dict[str, dict] = {}
    notes: dict[str, str] = {}
    for name in variants:  # loaded one after another: a load is timed on a quiet machine too
        ours, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(name, args.threads, str(gguf), theirs), daemon=True)
        process.start()
        theirs.close()  # so that a variant's process dying shows here as EOFError, not as a wait forever
        try:
            reply = ours.recv()
        except EOFError:
            process.join()
            reply = {"error": f"its process exited with code {process.exitcode} while loading"}
        if "error" in reply:
            notes[name] = reply["error"]
            process.join()
            continue
        workers[name] = (process, ours)
        loads[name] = reply
        print(f"{name}: loaded in {reply['load_s']:.1f} s", flush=True)

    runs: dict[str, list[dict]] = {name: [] for name in workers}
    prefills: dict[str, list[dict]] = {name: [] for name in workers}
    for round_index in range(args.rounds):
        for name, (_, connection) in workers.items():
            for prompt in prompts:
                connection.send((prompt, args.tokens))
                runs[name].append(connection.recv() | {"prompt": prompts.index(prompt), "round": round_index})
            if args.long_prompt:
                connection.send((long_ids, 2))
                prefills[name].append(connection.recv())
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    for process, connection in workers.values():
        connection.send(None)
        process.join(timeout=30)

    report = _report(args, loads, runs, prefills, notes, len(long_ids))
    _print(report)
    write_cpu_report(report, "cpu_decode", args.out)
    return report


def _report(args, loads: dict, runs: dict, prefills: dict, notes: dict, long_tokens: int) -> dict:
    float_text = {run["prompt"]: run["text"] for run in runs.get("float", []) if run["round"] == 0}
    variants = {}
    for name, results in runs.items():
        decode = [r["decode_tok_per_s"] for r in results if r["decode_tok_per_s"]]
        texts = {r["prompt"]: r["text"] for r in results if r["round"] == 0}
        agreement = None
        if float_text and name != "float":
            prefixes = [_common_prefix(texts[p], float_text[p]) for p in texts]
            agreement = {
                "same_text": sum(texts[p] == float_text[p] for p in texts),
                "prompts": len(texts),
                "mean_common_prefix_chars": statistics.mean(prefixes),
                "mean_float_chars": statistics.mean(len(t) for t in float_text.values()),
            }
        variants[name] = {
            "load_s": loads[name]["load_s"],
            "simd": loads[name].get("simd"),
            "peak_rss_mb": max([loads[name]["rss_mb"]] + [r["peak_rss_mb"] for r in results]),
            "rss_mb": results[-1]["rss_mb"],
            "decode_tok_per_s": median_and_range(decode),
            "first_token_ms": median_and_range([r["first_token_ms"] for r in results]),
            "prefill_tok_per_s": median_and_range([long_tokens / (r["first_token_ms"] / 1000) for r in prefills[name]])
            if prefills[name]
            else None,
            "agreement_with_float": agreement,
        }
    ratios = {}
    median = {name: v["decode_tok_per_s"]["median"] for name, v in variants.items()}
    if "float" in median and "fast" in median:
        ratios["fast_vs_float_ratio"] = median["fast"] / median["float"]
    if "llama.cpp" in median:
        for name in ("fast", "float"):
            if name in median:
                ratios[f"{name}_vs_llama_cpp_ratio"] = median[name] / median["llama.cpp"]
    return {
        "cpu": cpu_model(),
        "threads": args.threads,
        "tokens_per_answer": args.tokens,
        "prompts": len(PROMPTS),
        "rounds": args.rounds,
        "long_prompt_tokens": long_tokens,
        "load_average_1min": os.getloadavg()[0],
        "variants": variants,
        "ratios": ratios,
        "not_run": notes,
    }


def _print(report: dict) -> None:
    print(
        f"\n{report['cpu']}, {report['threads']} threads; {report['prompts']} prompts x {report['rounds']} rounds x "
        f"{report['tokens_per_answer']} tokens; load average {report['load_average_1min']:.2f}"
    )
    header = f"{'variant':<10} {'decode tok/s':>13} {'(min-max)':>13} {'TTFT ms':>8} {'prefill tok/s':>14}"
    print(header + f" {'load s':>7} {'RSS MB (peak)':>14}  agreement with float")
    for name, v in report["variants"].items():
        decode, first = v["decode_tok_per_s"], v["first_token_ms"]
        prefill = f"{v['prefill_tok_per_s']['median']:.0f}" if v["prefill_tok_per_s"] else "-"
        agreement = v["agreement_with_float"]
        agrees = (
            f"{agreement['same_text']}/{agreement['prompts']} same text, common prefix "
            f"{agreement['mean_common_prefix_chars']:.0f} of {agreement['mean_float_chars']:.0f} chars"
            if agreement
            else ""
        )
        print(
            f"{name:<10} {decode['median']:>13.1f} {decode['min']:>6.1f}-{decode['max']:<6.1f} {first['median']:>8.1f} "
            f"{prefill:>14} {v['load_s']:>7.1f} {v['rss_mb']:>6.0f} ({v['peak_rss_mb']:>5.0f})  {agrees}"
        )
    for name, value in report["ratios"].items():
        print(f"{name}: {value:.2f}")
    for name, v in report["variants"].items():
        print(f"{name} kernels: {v['simd']}")
    for name, why in report["not_run"].items():
        print(f"{name}: not run ({why})")


if __name__ == "__main__":
    main()
