import json
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests.worker.moe_offload.tiny_moe import build_tiny_qwen3_next
from worker.engine.moe_offload import converter
from worker.engine.moe_offload.checkpoint import UnsupportedModelError, weight_files
from worker.engine.moe_offload.converter import ConversionError, convert_checkpoint, is_converted, read_manifest
from worker.engine.moe_offload.packing import ExpertLayout


def _checkpoint_bytes(folder) -> int:
    return sum(path.stat().st_size for path in weight_files(folder))


def test_converts_a_sharded_checkpoint_layer_by_layer_with_bounded_memory(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(converter, "RESIDENT_FLUSH_BYTES", 256 * 1024)
    shards = weight_files(tiny_checkpoint)
    assert len(shards) > 10
    out = convert_checkpoint(tiny_checkpoint, tmp_path / "out", "nf4", host_memory_gb=0, show_progress=False)

    manifest = read_manifest(out)
    assert [entry["module"] for entry in manifest["experts"]] == [f"model.layers.{i}.mlp.experts" for i in range(4)]
    layout = ExpertLayout(256, 128, "nf4")
    for entry in manifest["experts"]:
        assert ExpertLayout.from_json(entry["layout"]) == layout
        assert (out / entry["file"]).stat().st_size >= 32 * layout.row_bytes
    assert len(manifest["resident_files"]) > 1  # flushed as it went, not held to the end
    # The conversion never held more than a small part of the model: experts quantized as read,
    # each layer written and freed when complete, resident weights flushed every 256 KB.
    assert manifest["conversion_peak_host_bytes"] < _checkpoint_bytes(tiny_checkpoint) / 3
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    assert not (out.parent / "out.partial").exists()


def test_host_memory_budget_too_small_is_a_clear_error_and_leaves_nothing_complete(tiny_checkpoint, tmp_path):
    with pytest.raises(ConversionError, match="HOST_MEMORY_GB"):
        convert_checkpoint(tiny_checkpoint, tmp_path / "out", "nf4", host_memory_gb=0.0001, show_progress=False)
    assert not is_converted(tmp_path / "out")


def test_not_enough_disk_is_a_clear_error(tiny_checkpoint, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6, 1000))
    with pytest.raises(ConversionError, match="GB of disk"):
        convert_checkpoint(tiny_checkpoint, tmp_path / "out", "nf4", host_memory_gb=0, show_progress=False)


def test_a_dense_model_is_refused_as_unsupported(tmp_path):
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedModelError, match="OFFLOAD=none"):
        convert_checkpoint(tmp_path / "llama", tmp_path / "out", "nf4", host_memory_gb=0, show_progress=False)


def test_fused_expert_tensors_convert_to_the_same_rows_as_per_expert_ones(tiny_checkpoint, converted, tmp_path):
    """Checkpoints saved with transformers' in-memory layout ([E, 2I, H] per layer) load too."""
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    tensors = {}
    for shard in weight_files(tiny_checkpoint):
        tensors.update(load_file(shard))
    fused = {key: value for key, value in tensors.items() if ".experts." not in key}
    for layer in range(4):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up = [
            torch.cat([tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"]])
            for e in range(32)
        ]
        fused[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{prefix}.down_proj"] = torch.stack([tensors[f"{prefix}.{e}.down_proj.weight"] for e in range(32)])
    save_file(fused, str(fused_dir / "model.safetensors"))
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / side, fused_dir / side)

    out = convert_checkpoint(fused_dir, tmp_path / "out", "nf4", host_memory_gb=0, show_progress=False)
    reference = converted("nf4")
    for entry in json.loads((out / converter.MANIFEST_NAME).read_text())["experts"]:
        assert torch.equal(load_file(out / entry["file"])["rows"], load_file(reference / entry["file"])["rows"])


def test_a_checkpoint_missing_experts_is_refused(tmp_path):
    checkpoint = build_tiny_qwen3_next(tmp_path / "ckpt", max_shard_size="100MB")
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.down_proj.weight"]
    save_file(tensors, str(checkpoint / "model.safetensors"))
    with pytest.raises(ConversionError, match="incomplete"):
        convert_checkpoint(checkpoint, tmp_path / "out", "nf4", host_memory_gb=0, show_progress=False)
