"""Any Hugging Face causal LM through transformers' own `generate`, on one device."""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from shared.schemas import GenerationOutcome, GenerationParams
from worker.engine.base import Engine, GenerationControl, InvalidGenerationInput
from worker.engine.compiled_decode import (
    CompiledDecode,
    DecodeHooks,
    configure_compiler,
    decode_cache_lengths,
    wants_compiled_decode,
)
from worker.engine.config import EngineConfig
from worker.engine.cpu_quant.kernels import kernels_available
from worker.engine.cpu_quant.model import quantize_linears
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.request_deadline import RequestDeadlineControl
from worker.engine.stop_strings import StopStringControl

log = logging.getLogger(__name__)

_GIB = 1024**3


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda, but torch sees no CUDA device")
    return requested


def pick_dtype(requested: str, device: str) -> torch.dtype:
    if requested == "auto":
        # On the CPU float32 measured faster than bfloat16 for the bundled model.
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, requested)


class _ControlStreamer(BaseStreamer):
    """Feeds each new token to the detokenizer and the job's control; skips the prompt's first put."""

    def __init__(self, detokenizer: IncrementalDetokenizer, control: GenerationControl):
        self.detokenizer = detokenizer
        self.control = control
        self.token_ids: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.token_ids.append(token_id)
            text = self.detokenizer.push(token_id)
            if text:
                self.control.emit(text)

    def end(self) -> None:
        text = self.detokenizer.flush()
        if text:
            self.control.emit(text)


class _ControlStopping(StoppingCriteria):
    def __init__(self, control: GenerationControl):
        self.control = control
        self.reason: str | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.reason = self.control.stop_reason()
        return torch.full((input_ids.shape[0],), self.reason is not None, dtype=torch.bool, device=input_ids.device)


class TransformersEngine(Engine):
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_name = config.model_name
        self.device = pick_device(config.device)
        self.torch_dtype = pick_dtype(config.dtype, self.device)
        self.dtype = str(self.torch_dtype).removeprefix("torch.")
        self.use_chat_template = config.apply_chat_template
        self.weights_path = config.model_path  # where `load` reads from; an engine that converts points it there
        self.context_length = 0
        self.model: Any = None  # a transformers PreTrainedModel once loaded
        self.tokenizer: Any = None
        self.compiled: CompiledDecode | None = None
        self.quantized_linears = False

    def load(self) -> None:
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(self.weights_path)
        self.model = self._load_model()
        self.context_length = self._context_length(self.model.config)
        self._eos_ids = self._eos_token_ids()
        if self.use_chat_template and not self.tokenizer.chat_template:
            log.info("%s has no chat template; prompts go in as plain text", self.model_name)
            self.use_chat_template = False
        if self.compiles_decode:
            self.compiled = self._compile_decode()
        log.info(
            "Loaded %s on %s (%s) in %.1f s", self.model_name, self.device, self.dtype, time.perf_counter() - started
        )

    @property
    def compiles_decode(self) -> bool:
        return wants_compiled_decode(self.config.decode_compile, self.device, self.quantized_linears)

    def _context_length(self, model_config) -> int:
        """Prompt + generated tokens a request may hold: the model's context, or `max_model_len` below it."""
        model_context = int(getattr(model_config.get_text_config(decoder=True), "max_position_embeddings", 0) or 2048)
        return min(model_context, self.config.max_model_len) if self.config.max_model_len else model_context

    def decode_hooks(self) -> DecodeHooks | None:
        """What runs between the compiled decode's graphs; a plain model has nothing there."""
        return None

    def _compile_decode(self) -> CompiledDecode | None:
        """`decode_compile` on fails loudly; auto falls back to eager decode with a warning."""
        hooks = self.decode_hooks()
        configure_compiler(
            self.model.config.get_text_config(decoder=True).num_hidden_layers, self.config.compile_cache_dir
        )
        try:
            compiled = CompiledDecode(self.model, decode_cache_lengths(self.device, self.context_length), hooks)
            prompt = torch.full((1, 8), next(iter(self._eos_ids), 0), device=self.device)
            with torch.inference_mode():
                compiled.warm_up(self.model.generate, prompt, pad_token_id=self._pad_token_id())
            return compiled
        except Exception:
            if self.config.decode_compile == "on":
                raise
            log.warning("Compiling the decode step failed; decoding eagerly", exc_info=True)
            if hooks is not None:
                hooks.compile_decode(False)
            return None

    def _pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id or next(iter(self._eos_ids), None)

    def _load_model(self) -> torch.nn.Module:
        model: Any = AutoModelForCausalLM.from_pretrained(self.weights_path, dtype=self.torch_dtype)
        model = model.to(self.device).eval()
        self._quantize_cpu_linears(model)
        return model

    def _quantize_cpu_linears(self, model: Any) -> None:
        """The linear layers onto the CPU's int4 kernels, where `cpu_weights` asks for them."""
        if not self._quantizes_linears():
            return
        started = time.perf_counter()
        weight_bytes = quantize_linears(model)
        self.quantized_linears = True
        self.dtype = f"int4/{self.dtype}"  # weights / activations
        elapsed = time.perf_counter() - started
        log.info("Linear weights packed to 4-bit blocks: %.0f MB in %.1f s", weight_bytes / 1e6, elapsed)

    def _quantizes_linears(self) -> bool:
        """`cpu_weights` on the CPU: int4 wants the kernels (and fails without them), auto takes them if they build."""
        if self.device != "cpu" or self.config.cpu_weights == "float":
            return False
        if kernels_available():
            return True
        if self.config.cpu_weights == "int4":
            raise RuntimeError("CPU_WEIGHTS=int4, but the int4 CPU kernels need AVX2 and a C++ compiler")
        return False

    def _eos_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _encode(self, params: GenerationParams) -> torch.Tensor:
        if params.messages is not None:
            return self._encode_chat([message.model_dump() for message in params.messages])
        if self.use_chat_template and params.apply_chat_template:
            return self._encode_chat([{"role": "user", "content": params.prompt}])
        return self.tokenizer(params.prompt, return_tensors="pt")["input_ids"]

    def _encode_chat(self, messages: list[dict[str, str]]) -> torch.Tensor:
        if not self.use_chat_template:  # a model without a template: a plain transcript, the reply to follow
            turns = "".join(f"{message['role'].capitalize()}: {message['content']}\n\n" for message in messages)
            return self.tokenizer(turns + "Assistant:", return_tensors="pt")["input_ids"]
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]

    @contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """Sampling from `seed`, without disturbing the random state unseeded requests draw from."""
        if seed is None:
            yield
            return
        devices = [torch.cuda.current_device()] if self.device == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def generate(self, params: GenerationParams, control: GenerationControl) -> GenerationOutcome:
        started = time.perf_counter()
        if params.deadline is not None:
            if time.time() > params.deadline:  # it waited in the queue past its deadline: never started
                return self._outcome("", [], 0, started, "timeout")
            control = RequestDeadlineControl(control, params.deadline)
        input_ids = self._encode(params)
        prompt_tokens = int(input_ids.shape[1])
        if prompt_tokens + params.max_tokens > self.context_length:
            raise InvalidGenerationInput(
                f"the prompt is {prompt_tokens} tokens and max_tokens is {params.max_tokens}, but the "
                f"model's context is {self.context_length} tokens",
                param="prompt" if prompt_tokens >= self.context_length else "max_tokens",
            )
        stops = StopStringControl(control, params.stop)
        streamer = _ControlStreamer(IncrementalDetokenizer(self.tokenizer), stops)
        stopping = _ControlStopping(stops)
        sampling = (
            {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            if params.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # The cache's tensors were made in inference mode: reset them in it too.
        with torch.inference_mode(), self._seeded(params.seed):
            length, compiled = prompt_tokens + params.max_tokens, self.compiled
            compiled_kwargs = compiled.generate_kwargs(length) if compiled is not None and compiled.fits(length) else {}
            self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=torch.ones_like(input_ids).to(self.device),
                max_new_tokens=params.max_tokens,
                min_new_tokens=min(params.min_tokens, params.max_tokens) or None,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([stopping]),
                pad_token_id=self._pad_token_id(),
                **sampling,
                **compiled_kwargs,
            )
        stops.finish()
        tokens = streamer.token_ids
        finish_reason = self._finish_reason(tokens, params.max_tokens, stopping.reason)
        return self._outcome(stops.text, tokens, prompt_tokens, started, finish_reason, stops.matched)

    def _outcome(
        self,
        text: str,
        tokens: list[int],
        prompt_tokens: int,
        started: float,
        finish_reason: str,
        stop_sequence: str | None = None,
    ) -> GenerationOutcome:
        elapsed = time.perf_counter() - started
        return GenerationOutcome(
            text=text,
            tokens_generated=len(tokens),
            prompt_tokens=prompt_tokens,
            generation_time=round(elapsed, 6),
            tokens_per_second=round(len(tokens) / elapsed, 3) if elapsed > 0 else 0.0,
            memory_used_gb=round(self.memory_used_gb(), 4),
            finish_reason=finish_reason,
            stop_sequence=stop_sequence,
        )

    def _finish_reason(self, tokens: list[int], max_tokens: int, stop_reason: str | None) -> str:
        if stop_reason is not None:
            return stop_reason
        if tokens and tokens[-1] in self._eos_ids:
            return "stop"
        return "length" if len(tokens) >= max_tokens else "stop"

    def memory_used_gb(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / _GIB
        return psutil.Process().memory_info().rss / _GIB
