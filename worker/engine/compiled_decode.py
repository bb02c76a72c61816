"""The decode step compiled: transformers' own auto-compile of `generate`'s decode forward (the prompt stays
eager) over a static cache that the engine keeps, so every request replays the same graphs.

Decode of one token is bound by host time, not by the device: Qwen3-Next's 48 layers run thousands of small
kernels per token in eager mode, each launched from Python. Inductor fuses them, and on a GPU
`mode="reduce-overhead"` replays each compiled stretch as one CUDA graph. Modules that must decide on the host
(the offloaded experts' host path) are marked `torch.compiler.disable`: the graph breaks around them and they
run eagerly between two graphs. What the model's engine hands over as its `DecodeHooks` compiles such work as
graphs of its own (`decode_graph`) and gets a call after every forward, outside the graphs.
"""

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch._dynamo.mutation_guard import GenerationTracker
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList, PretrainedConfig, StaticCache

from worker.engine.config import DecodeCompile

log = logging.getLogger(__name__)


class DecodeHooks(Protocol):
    """What a model with work between the compiled graphs (the offloaded experts) gives the compiled decode."""

    def compile_decode(self, compiled: bool) -> None:
        """Compile the work that runs between the graphs as graphs of its own; False: eager again."""

    def between_decode_steps(self) -> None:
        """Host work after each forward, outside the graphs."""


def configure_compiler(num_layers: int, cache_dir: Path | None) -> None:
    """The process-wide settings a compiled decode needs, set once before the first compile."""
    if cache_dir is not None:  # inductor reads it whenever it looks up or stores a compiled graph
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    # Each decoder layer compiles on its own (it indexes the cache by its layer number, a constant to the
    # compiler), once per compile mode; past dynamo's default of 8 versions per function the remaining layers
    # would run eagerly.
    limits = torch._dynamo.config
    limits.recompile_limit = max(limits.recompile_limit, 4 * num_layers + 8)
    limits.accumulated_recompile_limit = max(limits.accumulated_recompile_limit, 8 * num_layers + 64)


#: The CPU's static cache lengths: past about a thousand tokens the attention over the whole cache costs a
#: compiled step more than compiling saves, so longer requests decode eagerly there.
CPU_CACHE_LENGTHS = (256, 512, 1024)


def wants_compiled_decode(setting: DecodeCompile, device: str, quantized_linears: bool = False) -> bool:
    """auto: on CUDA, and on the CPU once its linear layers are quantized (float weights' decode is bound by
    reading them, so there compiling costs tens of seconds at load for a few percent)."""
    return setting == "on" or (setting == "auto" and (device == "cuda" or quantized_linears))


def decode_cache_lengths(device: str, context_length: int) -> list[int]:
    """The static caches to compile the decode step over: the whole context on a GPU; short ones on the CPU."""
    if device == "cuda":
        return [context_length]
    return sorted({min(length, context_length) for length in CPU_CACHE_LENGTHS})


def static_cache_bytes(config: PretrainedConfig, max_len: int, dtype: torch.dtype) -> int:
    """Key and value bytes a static cache of `max_len` tokens allocates (the part that grows with the length;
    linear-attention layers hold a fixed-size state instead)."""
    config = config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = getattr(config, "sliding_window", None) or max_len
    per_token = 2 * heads * head_dim * dtype.itemsize
    lengths = {
        "full_attention": max_len,
        "sliding_attention": min(window, max_len),
        "chunked_attention": min(window, max_len),
    }
    return sum(lengths.get(kind, 0) for kind in layer_types) * per_token


def decode_graph(eager: Callable[..., torch.Tensor], compiled: bool) -> Callable[..., torch.Tensor]:
    """`eager` itself, or compiled as one graph of fixed shapes for a module that runs between two graphs of
    the compiled decode step. Such a graph is never CUDA-graphed and is called without starting a new
    generation of the step's CUDA graph tree: entering any `torch.compile`d function counts as a new step
    to the tree, which would then free the outputs of the graphs before the gap while the gap still reads
    them ("accessing tensor output of CUDAGraphs that has been overwritten")."""
    if not compiled:
        return eager
    graph = torch.compile(eager, dynamic=False, fullgraph=True)

    def in_the_gap(*args: torch.Tensor) -> torch.Tensor:
        generation = GenerationTracker.generation
        try:
            return graph(*args)
        finally:
            GenerationTracker.generation = generation

    return in_the_gap


class CompiledDecode:
    """The static caches and compile settings that `generate` needs to run its decode step compiled.
    `configure_compiler` first.

    A static cache is read whole at every step, however much of it a request fills. `lengths` may hold
    several cache lengths: each request takes the shortest that holds it, and the step is compiled once with
    dynamic shapes for all of them (on the CPU, where the attention over a long cache costs more than
    compiling saves). One length compiles static shapes (CUDA graphs on a GPU)."""

    def __init__(
        self, model: Any, lengths: int | Sequence[int], hooks: DecodeHooks | None = None, cuda_graphs: bool = True
    ):
        lengths = sorted({lengths} if isinstance(lengths, int) else set(lengths))
        self.caches = {length: StaticCache(config=model.config, max_cache_len=length) for length in lengths}
        self.max_len = lengths[-1]
        graphs = cuda_graphs and model.device.type == "cuda" and len(lengths) == 1
        self.config = CompileConfig(
            fullgraph=False, dynamic=len(lengths) > 1, mode="reduce-overhead" if graphs else "default"
        )
        self.config._compile_all_devices = True  # type: ignore[assignment]  # transformers compiles only on accelerators unless told
        self.hooks: DecodeHooks | None = None
        self.attach(hooks)

    def attach(self, hooks: DecodeHooks | None) -> None:
        """Drive `hooks` from now on (None: nothing runs between the graphs); they compile their part now."""
        self.hooks = hooks
        if hooks is not None:
            hooks.compile_decode(True)

    def fits(self, tokens: int) -> bool:
        """Whether a request of `tokens` (prompt + new tokens) decodes compiled; a longer one decodes eagerly."""
        return tokens <= self.max_len

    def generate_kwargs(self, tokens: int = 0) -> dict:
        """For one `generate` call of up to `tokens`: the same cache tensors every time for a given length
        (CUDA graphs replay fixed addresses)."""
        if self.config.mode == "reduce-overhead":
            _cuda_graph_trees_on_this_thread()
        cache = self.caches[min(length for length in self.caches if length >= tokens)]
        cache.reset()
        kwargs = {"cache": cache, "compile_config": self.config}
        if self.hooks is not None:
            kwargs["logits_processor"] = LogitsProcessorList([_BetweenSteps(self.hooks)])
        return kwargs

    def warm_up(self, generate: Callable[..., object], prompt: torch.Tensor, **kwargs) -> float:
        """Compile (and on a GPU record the graphs) now, not during the first request: the first decode step
        compiles, the next ones warm up and record. Returns the seconds it took."""
        started = time.perf_counter()
        log.info("Compiling the decode step (static caches of %s tokens); this takes a while once", list(self.caches))
        generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            **self.generate_kwargs(int(prompt.shape[1]) + 6),
            **kwargs,
        )
        elapsed = time.perf_counter() - started
        log.info("Decode step compiled in %.1f s", elapsed)
        return elapsed


def _cuda_graph_trees_on_this_thread() -> None:
    """Inductor keeps its CUDA graph trees in thread-local state. Before torch 2.13 only the thread that imported it
    (and autograd's) had that state: a compiled decode run on any other thread, such as a second engine's own
    thread, failed an assertion (`torch._C._is_key_in_tls`). 2.13 sets the state up
    on first use; this does the same for the builds before it."""
    from torch._inductor import cudagraph_trees

    local = cudagraph_trees.local
    if hasattr(local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    local.tree_manager_containers = {}
    local.tree_manager_locks = defaultdict(threading.Lock)


class _BetweenSteps(LogitsProcessor):
    """`generate` calls its logits processors once after every forward, outside the compiled graphs: the
    place for host work between one decode step and the next. The scores pass through unchanged."""

    def __init__(self, hooks: DecodeHooks):
        self.hooks = hooks

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.hooks.between_decode_steps()
        return scores
