"""The bundled model on the CPU with the options beyond prompt/max_tokens/temperature: chat messages, stop
strings, seeds, top_p, a request deadline, and text cut inside a multi-byte character."""

import time

import pytest
import torch

from shared.schemas import ChatMessage, GenerationParams
from tests.worker.conftest import RecordingControl
from worker.engine.detokenizer import IncrementalDetokenizer

COUNTING = [ChatMessage(role="user", content="Count from 1 to 10, separated by commas.")]


def _generate(engine, **options):
    control = RecordingControl()
    outcome = engine.generate(GenerationParams(**{"max_tokens": 30, "temperature": 0.0, **options}), control)
    assert "".join(control.pieces) == outcome.text
    return outcome, control.pieces


def test_messages_go_through_the_chat_template_turn_by_turn(engine):
    messages = [
        ChatMessage(role="system", content="You are terse."),
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello."),
        ChatMessage(role="user", content="Bye"),
    ]
    text = engine.tokenizer.decode(
        engine._encode(GenerationParams(messages=messages, max_tokens=1, temperature=0.0))[0]
    )
    assert (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    ) in text


def test_a_job_takes_a_prompt_or_messages_not_both():
    with pytest.raises(ValueError, match="either a prompt or messages"):
        GenerationParams(prompt="Hi", messages=COUNTING, max_tokens=1, temperature=0.0)
    with pytest.raises(ValueError, match="either a prompt or messages"):
        GenerationParams(max_tokens=1, temperature=0.0)


def test_a_stop_string_ends_generation_and_is_not_returned(engine):
    # Unstopped, the model counts "1, 2, 3, 4, 5, 6, 7, 8, 9, 10" (29 tokens).
    stopped, pieces = _generate(engine, messages=COUNTING, stop=[", 5", "never"])
    assert stopped.text == "1, 2, 3, 4"
    assert stopped.finish_reason == "stop" and stopped.stop_sequence == ", 5"
    assert stopped.tokens_generated < 20  # it really stopped, not just trimmed
    assert not any("5" in piece for piece in pieces)


def test_the_same_seed_gives_the_same_sample_and_leaves_the_global_random_state_alone(engine):
    options = {"prompt": "Name a colour and say why you like it.", "temperature": 1.2, "max_tokens": 8}
    state = torch.get_rng_state()
    first, _ = _generate(engine, seed=1234, **options)
    assert torch.equal(torch.get_rng_state(), state)
    second, _ = _generate(engine, seed=1234, **options)
    others = {_generate(engine, seed=seed, **options)[0].text for seed in (1, 2)}
    assert first.text == second.text
    assert others - {first.text}, "other seeds should sample differently"


def test_a_tiny_top_p_keeps_only_the_most_likely_token(engine):
    greedy, _ = _generate(engine, prompt="Why is the sky blue?", max_tokens=8)
    nucleus, _ = _generate(engine, prompt="Why is the sky blue?", max_tokens=8, temperature=1.5, top_p=1e-6, seed=1)
    loose, _ = _generate(engine, prompt="Why is the sky blue?", max_tokens=8, temperature=1.5, top_p=1.0, seed=1)
    assert nucleus.text == greedy.text != loose.text


def test_a_request_deadline_truncates_the_generation(engine):
    outcome, _ = _generate(engine, prompt="Write a long story.", max_tokens=500, deadline=time.time() + 0.3)
    assert outcome.finish_reason == "timeout" and 0 < outcome.tokens_generated < 500


def test_a_deadline_that_passed_in_the_queue_generates_nothing(engine):
    outcome, pieces = _generate(engine, prompt="Hi", deadline=time.time() - 1)
    assert outcome.finish_reason == "timeout" and outcome.tokens_generated == 0 and pieces == []


def test_text_cut_inside_a_character_drops_the_partial_character(engine):
    """ "Hello there! 😊": the emoji's bytes span two tokens; stopping after the first leaves half of it."""
    ids = engine.tokenizer("Hello there! 😊")["input_ids"]
    cut = next(n for n in range(1, len(ids)) if engine.tokenizer.decode(ids[:n]).endswith("\ufffd"))
    detokenizer = IncrementalDetokenizer(engine.tokenizer)
    pieces = [detokenizer.push(token_id) for token_id in ids[:cut]] + [detokenizer.flush()]
    assert "".join(pieces) == detokenizer.text == "Hello there! "


@pytest.mark.parametrize("max_tokens", [4, 8])
def test_sampled_text_cut_by_max_tokens_never_ends_in_a_broken_character(engine, max_tokens):
    # The issue's own case: "Say hello." at temperature 0.7, which likes to answer with emoji.
    outcome, _ = _generate(engine, prompt="Say hello.", temperature=0.7, max_tokens=max_tokens, seed=0)
    assert "\ufffd" not in outcome.text
