"""llama.cpp on the same GPU and model shapes as `benchmarks/moe_offload_gpu.py`: the peer a user with a 16 GB card
would pick, in the same run.

llama-bench (built by `benchmarks/llama_cpp_cuda_build.sh`) runs a synthetic Qwen3-Next GGUF of the real shapes
(`benchmarks/synthetic_gguf.py`) with every layer on the GPU except the experts of the first N layers, which stay in
host RAM and run on the CPU (`--n-cpu-moe N`, llama.cpp's own way to fit a large MoE on a small card). Each N runs
in its own process while NVML watches that process's device memory; the fastest N whose peak stays within the
budget is llama.cpp's best configuration for that card. For it, the prompt-processing time of 512-, 2k- and
8k-token prompts (its time to first token, less one decode step).

    python -m benchmarks.llama_cpp_gpu [--n-cpu-moe 40,36,34,32] [--tokens 128] [--repetitions 3]

The bus is the card's own (`gpu_check.sh` logs its PCIe generation and width): llama.cpp's decode computes the
host-RAM experts on the CPU, not over the bus, while its prompt processing copies them over it.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Set
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.model_shapes import REAL_SHAPES, SMOKE_SHAPES
from benchmarks.nvml_memory import nvml_reader
from benchmarks.synthetic_gguf import gguf_bytes, write_synthetic_gguf
from worker.engine.cpu_extension import host_cpu_flags
from worker.system_stats import GpuProbe

ROOT = Path(__file__).resolve().parents[1]
BUILD_FIELDS = ("build_commit", "backends", "gpu_info", "cpu_info", "flash_attn", "n_threads")
RESULTS = ROOT / "benchmarks" / "results"
_GIB = 1024**3


@dataclass
class DecodeRow:
    n_cpu_moe: int
    tokens_per_second: float  # median over the repetitions
    tokens_per_second_min: float
    tokens_per_second_max: float
    nvml_peak_gib: float
    within_budget: bool


@dataclass
class PromptRow:
    n_cpu_moe: int
    prompt_tokens: int
    tokens_per_second: float
    seconds: float  # prompt_tokens / tokens_per_second: the time to first token less one decode step


def default_gguf_path(name: str, room_bytes: int) -> Path:
    """In RAM (/dev/shm) where it has room, so no disk holds or slows the file; else /tmp; else a clear stop."""
    for folder in (Path("/dev/shm"), Path("/tmp")):
        if folder.is_dir() and shutil.disk_usage(folder).free > room_bytes:
            return folder / name
    raise SystemExit(f"no room for the {room_bytes / 1e9:.0f} GB GGUF in /dev/shm or /tmp: pass --gguf, or --layers")


# What the AVX-512 build of llama.cpp's CPU backend was compiled for (/proc/cpuinfo's names).
AVX512_FLAGS = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni"}


def cpu_backend(binary_dir: Path, cpu_flags: Set[str]) -> Path:
    """The folder of the CPU backend to load: the AVX-512 build where this CPU has all it uses, else AVX2's."""
    avx512 = binary_dir / "avx512"
    return avx512 if avx512.is_dir() and cpu_flags >= AVX512_FLAGS else binary_dir


def library_path(binary_dir: Path) -> str:
    """LD_LIBRARY_PATH for llama-bench: its CPU backend for this CPU, its own libraries, then CUDA 13's runtime
    and cuBLAS from NVIDIA's pip wheels (a CUDA PyTorch install has them) or a system toolkit."""
    dirs = [cpu_backend(binary_dir, host_cpu_flags()), binary_dir]
    try:
        import nvidia  # namespace package of NVIDIA's wheels

        for root in nvidia.__path__:
            dirs += [lib.parent for lib in Path(root).glob("*/lib/libcudart.so.13")]
            dirs += [lib.parent for lib in Path(root).glob("*/lib/libcublas.so.13")]
    except ImportError:
        pass
    dirs.append(Path("/usr/local/cuda/lib64"))
    existing = os.environ.get("LD_LIBRARY_PATH", "")
    return ":".join(dict.fromkeys([*(str(d) for d in dirs), *filter(None, existing.split(":"))]))


def run_llama_bench(
    binary: Path, args: list[str], read_memory: Callable[[int], Callable[[], int]] | None, poll_s: float = 0.02
) -> tuple[list[dict], int]:
    """One llama-bench process: its JSON results and the peak of its device memory (0 without NVML)."""
    env = dict(os.environ, LD_LIBRARY_PATH=library_path(binary.parent))
    process = subprocess.Popen(
        [str(binary), *args, "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    peak, done = 0, threading.Event()

    def watch() -> None:
        nonlocal peak
        # made as the process starts, before it loads CUDA: where NVML lists no processes, the device's use
        # less this moment's is the process's
        read = read_memory(process.pid) if read_memory else None
        while read is not None and not done.is_set():
            peak = max(peak, read())
            time.sleep(poll_s)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = process.communicate()
    done.set()
    watcher.join()
    if process.returncode != 0:
        raise RuntimeError(f"llama-bench {' '.join(args)} exited with {process.returncode}: {stderr.decode()[-2000:]}")
    return json.loads(stdout), peak


def decode_row(n_cpu_moe: int, results: list[dict], peak_bytes: int, budget_gib: float) -> DecodeRow:
    samples = [sample for result in results for sample in result["samples_ts"]]
    return DecodeRow(
        n_cpu_moe=n_cpu_moe,
        tokens_per_second=round(statistics.median(samples), 2),
        tokens_per_second_min=round(min(samples), 2),
        tokens_per_second_max=round(max(samples), 2),
        nvml_peak_gib=round(peak_bytes / _GIB, 2),
        within_budget=peak_bytes <= budget_gib * _GIB,
    )


def best_within_budget(rows: list[DecodeRow]) -> DecodeRow | None:
    """The fastest configuration whose process stayed within the budget; None where none did."""
    fitting = [row for row in rows if row.within_budget]
    return max(fitting, key=lambda row: row.tokens_per_second, default=None)


def prompt_rows(n_cpu_moe: int, results: list[dict]) -> list[PromptRow]:
    rows = []
    for result in results:
        speed = statistics.median(result["samples_ts"])
        rows.append(PromptRow(n_cpu_moe, result["n_prompt"], round(speed, 1), round(result["n_prompt"] / speed, 3)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", type=Path, default=ROOT / ".llama" / "llama-bench")
    parser.add_argument("--gguf", type=Path, default=None, help="written if absent (default: in RAM, /dev/shm)")
    parser.add_argument("--layers", type=int, default=None, help="layers of the GGUF written (default: the model's 48)")
    parser.add_argument("--n-cpu-moe", default="40,36,34,32", help="comma-separated; each in its own process")
    parser.add_argument("--tokens", type=int, default=128, help="decode tokens per repetition")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--ttft", default="512,2048,8192", help="prompt sizes for the best configuration; '' = none")
    parser.add_argument("--budget-gib", type=float, default=15.0, help="device memory the process may hold (NVML)")
    parser.add_argument("--gpu-layers", type=int, default=99)
    parser.add_argument("--cpu", action="store_true", help="no GPU: check the script at tiny shapes, on the CPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    gpu = None if args.cpu else GpuProbe().read()
    if gpu is None and not args.cpu:
        raise SystemExit("NVML sees no GPU here: pass --cpu to check the script at tiny shapes on the CPU")
    card = gpu.name if gpu else "cpu"
    shapes = SMOKE_SHAPES if args.cpu else REAL_SHAPES
    layers = args.layers or shapes["num_hidden_layers"]
    if args.gguf is None:
        name, size = f"qwen3next-{'smoke' if args.cpu else 'synthetic'}-{layers}.gguf", gguf_bytes(shapes, layers)
        args.gguf = default_gguf_path(name, room_bytes=int(size * 1.05))
    if not args.gguf.exists():
        started = time.perf_counter()
        size = write_synthetic_gguf(args.gguf, shapes, layers)
        print(f"# wrote {args.gguf}: {size / 1e9:.1f} GB in {time.perf_counter() - started:.0f} s")
    read_memory = None if args.cpu else (lambda pid: nvml_reader(0, pid))
    print(
        f"# llama.cpp on {card}; {args.gguf} ({args.gguf.stat().st_size / 1e9:.1f} GB); budget {args.budget_gib:g} GiB"
    )

    out = args.out or RESULTS / f"llama_cpp_gpu-{card.replace(' ', '_')}.json"
    report: dict = {
        "card": card,
        "machine": platform.node(),
        "gguf": str(args.gguf),
        "gguf_bytes": args.gguf.stat().st_size,
        "layers": layers,
        "experts_quant": "Q4_K",
        "tokens": args.tokens,
        "repetitions": args.repetitions,
        "budget_gib": args.budget_gib,
        "build": {},
        "built_from": (args.binary.parent / "BUILD").read_text().strip()
        if (args.binary.parent / "BUILD").exists()
        else "",
        "cpu_backend": "avx512" if cpu_backend(args.binary.parent, host_cpu_flags()).name == "avx512" else "avx2",
        "decode": [],
        "failed": [],
        "best": None,
        "prompt": [],
        "prompt_nvml_peak_gib": None,
    }
    model = ["-m", str(args.gguf), "-ngl", "0" if args.cpu else str(args.gpu_layers)]
    rows: list[DecodeRow] = []
    for n_cpu_moe in (int(n) for n in args.n_cpu_moe.split(",")):
        decode = ["-ncmoe", str(n_cpu_moe), "-p", "0", "-n", str(args.tokens), "-r", str(args.repetitions)]
        try:
            results, peak = run_llama_bench(args.binary, [*model, *decode], read_memory)
        except RuntimeError as error:  # one configuration failing leaves the others' rows
            print(f"# n_cpu_moe {n_cpu_moe}: {error}")
            report["failed"].append({"n_cpu_moe": n_cpu_moe, "error": str(error)})
            continue
        report["build"] = {key: results[0].get(key) for key in BUILD_FIELDS}
        rows.append(decode_row(n_cpu_moe, results, peak, args.budget_gib))
        report["decode"] = [asdict(row) for row in rows]
        write_report(out, report)  # after every row: a run cut off keeps what it measured
        row = rows[-1]
        print(
            f"| n_cpu_moe {n_cpu_moe:>3} | {row.tokens_per_second:7.2f} tok/s ({row.tokens_per_second_min:.2f}-"
            f"{row.tokens_per_second_max:.2f}) | NVML peak {row.nvml_peak_gib:6.2f} GiB | "
            f"{'fits' if row.within_budget else 'over budget'} |"
        )
    best = best_within_budget(rows)
    report["best"] = asdict(best) if best else None
    print(
        f"# best within {args.budget_gib:g} GiB: "
        + (f"{best.n_cpu_moe}, {best.tokens_per_second} tok/s" if best else "none")
    )
    if best is not None and args.ttft:
        prompt = ["-ncmoe", str(best.n_cpu_moe), "-p", args.ttft, "-n", "0", "-r", "2"]
        results, peak = run_llama_bench(args.binary, [*model, *prompt], read_memory)
        report["prompt"] = [asdict(row) for row in prompt_rows(best.n_cpu_moe, results)]
        report["prompt_nvml_peak_gib"] = round(peak / _GIB, 2)
        for entry in report["prompt"]:
            tokens, speed, seconds = entry["prompt_tokens"], entry["tokens_per_second"], entry["seconds"]
            print(f"| prompt {tokens:>5} | {speed:8.1f} tok/s | {seconds:6.2f} s |")
        print(f"# prompts: NVML peak {peak / _GIB:.2f} GiB")
    write_report(out, report)
    print(f"wrote {out}")


def write_report(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
