"""A Qwen3-Next GGUF with random weights, for llama.cpp to run at the shapes our offload engine is measured at.

Names, shapes and metadata are those llama.cpp's own converter writes for Qwen3-Next (checked against a converted
tiny checkpoint); the weights are random bytes with sane block scales, since no kernel's speed depends on the
values. Expert matrices are Q4_K (4.5 bits a weight, as NF4 with its absmax is for our engine), the output Q6_K,
routers, norms and the DeltaNet's small tensors float32, as llama.cpp's quantizer leaves them.

    python -m benchmarks.synthetic_gguf OUT.gguf [--layers 48] [--smoke]
"""

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

from benchmarks.model_shapes import REAL_SHAPES, SMOKE_SHAPES

ARCH = "qwen3next"
Q4_K, Q6_K, Q8_0, F32 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q8_0, None
# Where each block type keeps its float16 scale(s), and the values written there: small enough that activations
# stay finite through the layers.
_SCALES = {
    Q4_K: [(0, 2.0**-10), (2, 2.0**-11)],  # d, dmin
    Q6_K: [(208, 2.0**-12)],  # d, after ql, qh and the int8 scales
    Q8_0: [(0, 2.0**-10)],
}
_SHIFT_BYTES = 16 << 20
CONTEXT_LENGTH = 262_144  # the released model's (llama.cpp warns of prompts past what a GGUF declares)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # GGUF order: the row (contiguous) dimension first
    kind: GGMLQuantizationType | None  # None: float32
    fill: str = "random"  # "ones" for norm weights, "negative" for the DeltaNet's A

    @property
    def elements(self) -> int:
        return int(np.prod(self.dims))

    @property
    def nbytes(self) -> int:
        if self.kind is None:
            return self.elements * 4
        block, block_bytes = GGML_QUANT_SIZES[self.kind]
        return self.elements // block * block_bytes


def quantized(preferred: GGMLQuantizationType, row: int) -> GGMLQuantizationType | None:
    """The preferred block type where rows split into its blocks, else Q8_0 (tiny test shapes), else float32."""
    for kind in (preferred, Q8_0):
        if row % GGML_QUANT_SIZES[kind][0] == 0:
            return kind
    return None


def tensor_specs(shapes: dict, layers: int) -> Iterator[TensorSpec]:
    embd, vocab = shapes["hidden_size"], shapes["vocab_size"]
    key_dim = shapes["linear_key_head_dim"] * shapes["linear_num_key_heads"]
    value_dim = shapes["linear_value_head_dim"] * shapes["linear_num_value_heads"]
    conv_dim = key_dim * 2 + value_dim  # the DeltaNet's q, k and v, convolved together
    v_heads, head_dim = shapes["linear_num_value_heads"], shapes["head_dim"]
    q_dim, kv_dim = head_dim * shapes["num_attention_heads"], head_dim * shapes["num_key_value_heads"]
    experts, ff_exp, ff_shared = (
        shapes["num_experts"],
        shapes["moe_intermediate_size"],
        shapes["shared_expert_intermediate_size"],
    )

    def weight(name: str, row: int, *rest: int, preferred: GGMLQuantizationType = Q4_K) -> TensorSpec:
        return TensorSpec(name, (row, *rest), quantized(preferred, row))

    yield weight("token_embd.weight", embd, vocab)
    yield TensorSpec("output_norm.weight", (embd,), F32, "ones")
    yield weight("output.weight", embd, vocab, preferred=Q6_K)
    for layer in range(layers):
        blk = f"blk.{layer}."
        yield TensorSpec(blk + "attn_norm.weight", (embd,), F32, "ones")
        yield TensorSpec(blk + "post_attention_norm.weight", (embd,), F32, "ones")
        if is_recurrent(layer, shapes["full_attention_interval"]):  # Gated DeltaNet
            yield weight(blk + "attn_qkv.weight", embd, conv_dim)
            yield weight(blk + "attn_gate.weight", embd, value_dim)
            yield TensorSpec(blk + "ssm_conv1d.weight", (shapes["linear_conv_kernel_dim"], conv_dim), F32)
            yield TensorSpec(blk + "ssm_dt.bias", (v_heads,), F32)
            yield TensorSpec(blk + "ssm_a", (v_heads,), F32, "negative")
            yield weight(blk + "ssm_ba.weight", embd, 2 * v_heads)
            yield TensorSpec(blk + "ssm_norm.weight", (shapes["linear_value_head_dim"],), F32, "ones")
            yield weight(blk + "ssm_out.weight", value_dim, embd)
        else:  # gated full attention
            yield weight(blk + "attn_q.weight", embd, q_dim * 2)
            yield weight(blk + "attn_k.weight", embd, kv_dim)
            yield weight(blk + "attn_v.weight", embd, kv_dim)
            yield weight(blk + "attn_output.weight", q_dim, embd)
            yield TensorSpec(blk + "attn_q_norm.weight", (head_dim,), F32, "ones")
            yield TensorSpec(blk + "attn_k_norm.weight", (head_dim,), F32, "ones")
        yield TensorSpec(blk + "ffn_gate_inp.weight", (embd, experts), F32)
        yield weight(blk + "ffn_gate_exps.weight", embd, ff_exp, experts)
        yield weight(blk + "ffn_up_exps.weight", embd, ff_exp, experts)
        yield weight(blk + "ffn_down_exps.weight", ff_exp, embd, experts)
        yield TensorSpec(blk + "ffn_gate_inp_shexp.weight", (embd, 1), F32)
        yield weight(blk + "ffn_gate_shexp.weight", embd, ff_shared)
        yield weight(blk + "ffn_up_shexp.weight", embd, ff_shared)
        yield weight(blk + "ffn_down_shexp.weight", ff_shared, embd)


def is_recurrent(layer: int, full_attention_interval: int) -> bool:
    """Every `full_attention_interval`-th layer is full attention, the others Gated DeltaNet."""
    return (layer + 1) % full_attention_interval != 0


def gguf_bytes(shapes: dict, layers: int) -> int:
    """The tensors' bytes: the file's size less its header (a few MB, the vocabulary)."""
    return sum(spec.nbytes for spec in tensor_specs(shapes, layers))


def add_metadata(writer: GGUFWriter, shapes: dict, layers: int) -> None:
    writer.add_name("synthetic Qwen3-Next (random weights)")
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_quantization_version(2)
    writer.add_block_count(layers)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(shapes["hidden_size"])
    writer.add_feed_forward_length(shapes["intermediate_size"])
    writer.add_head_count(shapes["num_attention_heads"])
    writer.add_head_count_kv(shapes["num_key_value_heads"])
    writer.add_key_length(shapes["head_dim"])
    writer.add_value_length(shapes["head_dim"])
    writer.add_rope_freq_base(10_000_000.0)
    writer.add_rope_dimension_count(int(shapes["head_dim"] * shapes["partial_rotary_factor"]))
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(shapes["num_experts"])
    writer.add_expert_used_count(shapes["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(shapes["moe_intermediate_size"])
    writer.add_expert_shared_feed_forward_length(shapes["shared_expert_intermediate_size"])
    writer.add_ssm_conv_kernel(shapes["linear_conv_kernel_dim"])
    writer.add_ssm_state_size(shapes["linear_key_head_dim"])
    writer.add_ssm_group_count(shapes["linear_num_key_heads"])
    writer.add_ssm_time_step_rank(shapes["linear_num_value_heads"])
    writer.add_ssm_inner_size(shapes["linear_value_head_dim"] * shapes["linear_num_value_heads"])
    writer.add_full_attention_interval(shapes["full_attention_interval"])
    # A SentencePiece-style vocabulary of placeholder pieces: llama.cpp's benchmark feeds token ids, not text.
    vocab = shapes["vocab_size"]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{index}>" for index in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([1] * vocab)  # normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


class RandomBlocks:
    """Random blocks of one quantized type, their scales set, enough for the largest tensor of that type plus a
    shift: each tensor is a view starting at a random block, so no tensor costs a copy or fresh random bytes,
    and writing the 80B model's file runs at the speed of the disk (or of memory, in /dev/shm)."""

    def __init__(self, kind: GGMLQuantizationType, largest_bytes: int, rng: np.random.Generator):
        self.block_bytes = GGML_QUANT_SIZES[kind][1]
        self.shift_blocks = _SHIFT_BYTES // self.block_bytes
        blocks = rng.integers(
            0, 256, (largest_bytes // self.block_bytes + self.shift_blocks, self.block_bytes), np.uint8
        )
        for offset, scale in _SCALES[kind]:
            blocks[:, offset : offset + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
        self.flat = blocks.reshape(-1)

    def view(self, nbytes: int, rng: np.random.Generator) -> np.ndarray:
        start = int(rng.integers(0, self.shift_blocks)) * self.block_bytes
        return self.flat[start : start + nbytes]


def float_data(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.fill == "ones":
        values = np.ones(spec.elements, np.float32)
    elif spec.fill == "negative":
        values = -np.exp(rng.standard_normal(spec.elements, dtype=np.float32))
    else:
        values = rng.standard_normal(spec.elements, dtype=np.float32) * np.float32(0.02)
    return values.reshape(spec.dims[::-1])


def write_synthetic_gguf(path: Path, shapes: dict, layers: int | None = None, seed: int = 0) -> int:
    """Write the file; returns its size in bytes. Memory stays at about the largest tensor of each block type
    (a layer's 512 experts of one matrix, 0.3 GB) plus a shift, whatever the model's size."""
    layers = layers or shapes["num_hidden_layers"]
    specs = list(tensor_specs(shapes, layers))
    writer = GGUFWriter(path, ARCH)
    add_metadata(writer, shapes, layers)
    for spec in specs:
        if spec.kind is None:
            writer.add_tensor_info(spec.name, spec.dims[::-1], np.dtype(np.float32), spec.nbytes)
        else:  # quantized tensors are described by their bytes' shape: rows of blocks
            block, block_bytes = GGML_QUANT_SIZES[spec.kind]
            byte_shape = (*spec.dims[1:][::-1], spec.dims[0] // block * block_bytes)
            writer.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), spec.nbytes, raw_dtype=spec.kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    sources = {
        kind: RandomBlocks(kind, max(spec.nbytes for spec in specs if spec.kind == kind), rng)
        for kind in {spec.kind for spec in specs if spec.kind is not None}
    }
    for spec in specs:
        data = float_data(spec, rng) if spec.kind is None else sources[spec.kind].view(spec.nbytes, rng)
        writer.write_tensor_data(data)
    writer.close()
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=None, help="default: the model's own (48)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes")
    args = parser.parse_args()
    started = time.perf_counter()
    size = write_synthetic_gguf(args.out, SMOKE_SHAPES if args.smoke else REAL_SHAPES, args.layers)
    print(f"wrote {args.out}: {size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
