import pytest
import torch

from shared.schemas import GenerationParams
from tests.worker.conftest import RecordingControl
from worker.engine.base import InvalidGenerationInput
from worker.engine.detokenizer import IncrementalDetokenizer


def test_greedy_generation_matches_transformers_generate(engine):
    params = GenerationParams(prompt="Why is the sky blue?", max_tokens=24, temperature=0.0)
    control = RecordingControl()
    outcome = engine.generate(params, control)

    input_ids = engine._encode(params)
    with torch.inference_mode():
        reference = engine.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=24, do_sample=False
        )
    expected = engine.tokenizer.decode(reference[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert outcome.text == expected
    assert "".join(control.pieces) == outcome.text
    assert outcome.tokens_generated == reference.shape[1] - input_ids.shape[1]
    assert outcome.prompt_tokens == input_ids.shape[1]
    assert outcome.tokens_per_second > 0 and outcome.memory_used_gb > 0


def test_the_chat_template_is_applied(engine):
    ids = engine._encode(GenerationParams(prompt="Hi", max_tokens=1, temperature=0.0))
    assert "<|im_start|>user\nHi<|im_end|>" in engine.tokenizer.decode(ids[0])
    raw = engine._encode(GenerationParams(prompt="Hi", max_tokens=1, temperature=0.0, apply_chat_template=False))
    assert raw.shape[1] < ids.shape[1]


def test_max_tokens_bounds_the_output(engine):
    outcome = engine.generate(
        GenerationParams(prompt="Tell me a long story.", max_tokens=5, temperature=0.0), RecordingControl()
    )
    assert outcome.tokens_generated == 5
    assert outcome.finish_reason == "length"


def test_sampling_with_temperature_varies(engine):
    torch.manual_seed(0)
    params = GenerationParams(prompt="Name a colour.", max_tokens=12, temperature=1.5)
    texts = {engine.generate(params, RecordingControl()).text for _ in range(3)}
    assert len(texts) > 1


@pytest.mark.parametrize("reason", ["cancelled", "timeout"])
def test_generation_stops_cooperatively(engine, reason):
    control = RecordingControl(stop_after=3, reason=reason)
    outcome = engine.generate(GenerationParams(prompt="Count to fifty.", max_tokens=50, temperature=0.0), control)
    assert outcome.finish_reason == reason
    assert outcome.tokens_generated <= 4


def test_a_prompt_beyond_the_context_is_refused(engine):
    long_prompt = "word " * (engine.context_length + 10)
    with pytest.raises(InvalidGenerationInput) as error:
        engine.generate(GenerationParams(prompt=long_prompt, max_tokens=5, temperature=0.0), RecordingControl())
    assert error.value.param == "prompt"
    assert str(engine.context_length) in str(error.value)


def test_prompt_plus_max_tokens_beyond_the_context_blames_max_tokens(engine):
    with pytest.raises(InvalidGenerationInput) as error:
        engine.generate(
            GenerationParams(prompt="Hi", max_tokens=engine.context_length, temperature=0.0), RecordingControl()
        )
    assert error.value.param == "max_tokens"


@pytest.mark.parametrize(
    "text", ["Hello, world! It's   spaced.", "naïve café, 日本語, emoji 🙂🚀 done", "line one\n\tline two\n"]
)
def test_incremental_detokenizer_reproduces_a_full_decode(engine, text):
    ids = engine.tokenizer(text)["input_ids"]
    detokenizer = IncrementalDetokenizer(engine.tokenizer)
    pieces = [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]
    assert "".join(pieces) == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in piece for piece in pieces)


def test_the_stop_signal_is_on_the_device_of_the_tokens():
    """transformers ORs every stopping criterion's answer on the tokens' device: a CPU answer fails on a GPU
    (seen on an H100). The meta device stands in for one here."""
    from worker.engine.transformers_engine import _ControlStopping

    control = RecordingControl()
    answer = _ControlStopping(control)(torch.zeros((2, 5), dtype=torch.long, device="meta"), None)
    assert answer.device.type == "meta" and answer.shape == (2,) and answer.dtype == torch.bool
