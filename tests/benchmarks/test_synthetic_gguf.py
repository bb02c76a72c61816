"""The synthetic Qwen3-Next GGUF that llama.cpp runs beside our engine: the tensors and metadata llama.cpp's own
converter writes for the same shapes, and block scales that keep it finite."""

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from benchmarks.model_shapes import REAL_SHAPES, SMOKE_SHAPES
from benchmarks.synthetic_gguf import gguf_bytes, tensor_specs, write_synthetic_gguf

# What llama.cpp's convert_hf_to_gguf.py wrote for tests/worker/moe_offload/tiny_moe.py's model (see "_source").
REFERENCE = json.loads((Path(__file__).parent / "qwen3next_gguf_reference.json").read_text())


def test_tiny_file_matches_what_llama_cpps_converter_writes(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_synthetic_gguf(path, dict(SMOKE_SHAPES, vocab_size=REFERENCE["vocab_size"]))
    reader = GGUFReader(path)

    assert {t.name: [int(d) for d in t.shape] for t in reader.tensors} == REFERENCE["tensors"]
    for key, value in REFERENCE["metadata"].items():
        assert reader.fields[key].contents() == value, key
    assert reader.fields["general.architecture"].contents() == "qwen3next"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == REFERENCE["vocab_size"]


def test_quantized_blocks_carry_finite_small_scales(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_synthetic_gguf(path, SMOKE_SHAPES)
    tensors = {t.name: t for t in GGUFReader(path).tensors}

    gate = tensors["blk.0.ffn_gate_exps.weight"]  # rows of 256: Q4_K, 144-byte blocks, d then dmin first
    assert gate.tensor_type == GGMLQuantizationType.Q4_K
    blocks = np.asarray(gate.data).reshape(-1, 144)
    d, dmin = (blocks[:, offset : offset + 2].copy().view(np.float16) for offset in (0, 2))
    assert np.all(d == np.float16(2.0**-10)) and np.all(dmin == np.float16(2.0**-11))
    assert len(np.unique(blocks[:, 16:])) > 200  # the quants themselves are random bytes

    down = tensors["blk.0.ffn_down_exps.weight"]  # rows of 128 do not split into Q4_K blocks
    assert down.tensor_type == GGMLQuantizationType.Q8_0
    norm = np.asarray(tensors["blk.0.attn_norm.weight"].data)
    assert np.all(norm == 1.0)


def test_real_shapes_experts_are_4_5_bits_and_most_of_the_file():
    specs = list(tensor_specs(REAL_SHAPES, REAL_SHAPES["num_hidden_layers"]))
    experts = [spec for spec in specs if "_exps." in spec.name]
    expert_bits = 8 * sum(spec.nbytes for spec in experts) / sum(spec.elements for spec in experts)
    total = gguf_bytes(REAL_SHAPES, REAL_SHAPES["num_hidden_layers"])

    assert {spec.kind for spec in experts} == {GGMLQuantizationType.Q4_K}
    assert expert_bits == 4.5
    assert 0.9 < sum(spec.nbytes for spec in experts) / total < 1.0
    assert 40e9 < total < 50e9  # about the size of the published Q4_K GGUFs of the 80B model
