"""Whole models with their linear layers quantized: the bundled model against its float self (greedy agreement
on a fixed prompt set, perplexity on a text shipped here), a tiny random Llama's compiled decode against its
eager decode, and how the engine picks the weights (CPU_WEIGHTS)."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

from tests.worker.cpu_quant.conftest import needs_avx2
from worker.engine.compiled_decode import CompiledDecode, configure_compiler, decode_cache_lengths
from worker.engine.config import EngineConfig
from worker.engine.cpu_quant.linear import QuantizedLinear
from worker.engine.cpu_quant.model import quantize_linears
from worker.engine.transformers_engine import TransformersEngine


def needs_kernels(test):
    """Skipped only without AVX2; with it, the kernels must build (`built_kernels` fails the test otherwise)."""
    return needs_avx2(pytest.mark.usefixtures("built_kernels")(test))


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
    "List three colours of the rainbow.",
    "How many legs does a spider have?",
    "Give me a short tip for learning to cook.",
]
GREEDY_TOKENS = 24
PERPLEXITY_TOKENS = 160
TEXT = Path(__file__).with_name("data") / "perplexity.txt"


@pytest.fixture(scope="module")
def bundled_pair(bundled_model_path):
    """The bundled model twice: as loaded (float32), and with its linear layers quantized."""
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    float_model = AutoModelForCausalLM.from_pretrained(bundled_model_path, dtype=torch.float32).eval()
    quantized = AutoModelForCausalLM.from_pretrained(bundled_model_path, dtype=torch.float32).eval()
    weight_bytes = quantize_linears(quantized)
    return tokenizer, float_model, quantized, weight_bytes


def _greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def _text_ids(tokenizer) -> torch.Tensor:
    return tokenizer(TEXT.read_text(), return_tensors="pt")["input_ids"][:, :PERPLEXITY_TOKENS]


def _perplexity(model, tokenizer) -> float:
    """Over the whole text in one forward (a prompt's path: many rows at once)."""
    ids = _text_ids(tokenizer)
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss
    return math.exp(float(loss))


def _perplexity_token_by_token(model, tokenizer) -> float:
    """Teacher-forced one token at a time over the cache: decode's path (the kernels: one row at a time)."""
    ids = _text_ids(tokenizer)
    cache, log_likelihood = DynamicCache(), 0.0
    with torch.inference_mode():
        for position in range(ids.shape[1] - 1):
            logits = model(ids[:, position : position + 1], cache=cache, use_cache=True).logits
            log_likelihood += float(torch.log_softmax(logits[0, -1].float(), -1)[ids[0, position + 1]])
    return math.exp(-log_likelihood / (ids.shape[1] - 1))


@needs_kernels
def test_the_quantized_bundled_model_is_small_and_shaped_as_before(bundled_pair):
    _, float_model, quantized, weight_bytes = bundled_pair
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert quantized.get_output_embeddings().format == "q8"
    assert {m.format for m in layers} == {"q4", "q8"}
    float_bytes = sum(m.weight.numel() * 4 for m in float_model.modules() if isinstance(m, torch.nn.Linear))
    assert weight_bytes < float_bytes / 4  # 4.5 bits a weight (8.5 for the head) against 32


@needs_kernels
def test_greedy_decoding_agrees_with_the_float_model(bundled_pair):
    """The bundled weights came from a Q4_1 GGUF, so q4 packs them without a second rounding: what differs
    is the activations' int16 rounding and the head's 8 bits. Greedy text must follow the float model's."""
    tokenizer, float_model, quantized, _ = bundled_pair
    first_token_agree, prefixes = 0, []
    for prompt in PROMPTS:
        expected, actual = _greedy(float_model, tokenizer, prompt), _greedy(quantized, tokenizer, prompt)
        first_token_agree += expected[0] == actual[0]
        prefix = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b), GREEDY_TOKENS)
        prefixes.append(prefix)
    assert first_token_agree == len(PROMPTS)
    assert sum(prefixes) / len(prefixes) >= GREEDY_TOKENS * 0.75, prefixes


@needs_kernels
def test_perplexity_stays_within_two_percent_of_the_float_model(bundled_pair):
    """Decoding, the text goes through the kernels a row at a time; a prompt goes through the unpacked
    weights, which are the float model's own here (the Q4_1 codes come back exactly), so it must match."""
    tokenizer, float_model, quantized, _ = bundled_pair
    reference = _perplexity(float_model, tokenizer)
    assert 1.0 < reference < 100.0  # the text is ordinary English: the model is not guessing
    decoded = _perplexity_token_by_token(quantized, tokenizer)
    assert abs(decoded / reference - 1.0) < 0.02, (decoded, reference)
    assert abs(_perplexity(quantized, tokenizer) / reference - 1.0) < 1e-3


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.slow
@needs_kernels
def test_compiled_decode_over_several_cache_lengths_generates_what_eager_decode_does(tmp_path, monkeypatch):
    """The CPU's compiled step: one dynamic-shape graph over static caches of several lengths, each request
    taking the shortest that holds it; the quantized layers are single ops inside the graph."""
    import torch._dynamo.utils

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = _tiny_llama()
    quantize_linears(model)
    assert model.config.tie_word_embeddings is False  # the head is its own q8 copy now
    configure_compiler(model.config.num_hidden_layers, tmp_path / "compile")
    compiled = CompiledDecode(model, [32, 64])
    prompt = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.inference_mode():
        eager_tokens = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False
        )
        compiled.warm_up(model.generate, prompt)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for budget in (12, 40):  # the 32-token cache, then the 64-token one
            kwargs = compiled.generate_kwargs(prompt.shape[1] + budget)
            assert kwargs["cache"].get_max_length() == (32 if budget == 12 else 64)
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, **kwargs
            )
            assert torch.equal(out, eager_tokens)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # the second length: no recompile
    assert compiled.fits(64) and not compiled.fits(65)


def test_the_cpu_compiles_short_caches_and_a_gpu_the_whole_context():
    assert decode_cache_lengths("cpu", 8192) == [256, 512, 1024]
    assert decode_cache_lengths("cpu", 300) == [256, 300]
    assert decode_cache_lengths("cpu", 96) == [96]
    assert decode_cache_lengths("cuda", 8192) == [8192]


@pytest.mark.parametrize(
    ("setting", "built", "expected"), [("auto", True, True), ("auto", False, False), ("float", True, False)]
)
def test_cpu_weights_chooses_the_int4_path_where_the_kernels_build(
    bundled_model_path, monkeypatch, setting, built, expected
):
    monkeypatch.setattr("worker.engine.transformers_engine.kernels_available", lambda: built)
    engine = TransformersEngine(EngineConfig(bundled_model_path, "bundled", device="cpu", cpu_weights=setting))
    assert engine._quantizes_linears() is expected


def test_cpu_weights_int4_without_the_kernels_fails_at_load_with_the_reason(bundled_model_path, monkeypatch):
    monkeypatch.setattr("worker.engine.transformers_engine.kernels_available", lambda: False)
    engine = TransformersEngine(EngineConfig(bundled_model_path, "bundled", device="cpu", cpu_weights="int4"))
    with pytest.raises(RuntimeError, match="AVX2 and a C\\+\\+ compiler"):
        engine.load()
