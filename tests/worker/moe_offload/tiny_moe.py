"""Tiny random-weight MoE checkpoints built offline, saved the way the hub stores them (sharded safetensors,
one tensor per expert matrix), with a small byte-level BPE tokenizer trained on the spot."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3NextConfig, Qwen3NextForCausalLM

from benchmarks.model_shapes import SMOKE_SHAPES
from worker.engine.config import EngineConfig

VOCAB_SIZE = SMOKE_SHAPES["vocab_size"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route each token to a few experts out of many.",
    "A queue-backed inference service runs one job at a time on the GPU.",
    "Hello world, tell me a story about a cache of experts and a bus called PCIe.",
] * 8


def tiny_qwen3_next_config(**overrides) -> Qwen3NextConfig:
    """The test model: the benchmarks' smoke shapes (4 layers: 3 Gated DeltaNet + 1 attention, hidden 256,
    32 experts, top-4), a 512-token context, token id 0 for the special tokens."""
    values = dict(SMOKE_SHAPES, max_position_embeddings=512, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    values.update(overrides)
    return Qwen3NextConfig(**values)


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_qwen3_next(folder: Path, seed: int = 0, max_shard_size: str = "300KB") -> Path:
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(tiny_qwen3_next_config(vocab_size=len(tokenizer))).eval()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    return folder


def float_reference(folder: Path) -> EngineConfig:
    """The plain engine's config for the tiny model as the reference: float32 weights, eager, plain text."""
    return EngineConfig(
        str(folder),
        "plain",
        device="cpu",
        dtype="float32",
        decode_compile="off",
        cpu_weights="float",
        apply_chat_template=False,
    )
