"""What a checkpoint holds, read without loading it: config, shard files, and which modules are fused experts."""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

# Files besides the weights that a converted model keeps (config, tokenizer, chat template...).
SIDE_FILE_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]

# Checkpoint spellings of one expert's matrices, per family (Qwen/DeepSeek style and Mixtral style).
_EXPERT_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_PER_EXPERT_KEY = re.compile(r"^(?P<module>.+\.experts)\.(?P<index>\d+)\.(?P<part>\w+)\.weight$")
_FUSED_KEY = re.compile(r"^(?P<module>.+\.experts)\.(?P<part>gate_up_proj|down_proj)$")
# Checkpoint module names that transformers renames on load (Mixtral's block_sparse_moe -> mlp).
_RENAMES = ((".block_sparse_moe.", ".mlp."),)


class UnsupportedModelError(ValueError):
    """The model has no fused-experts MoE layers this engine knows how to offload."""


@dataclass(frozen=True)
class ExpertsModuleInfo:
    name: str  # qualified module name in the transformers model, e.g. model.layers.3.mlp.experts
    num_experts: int
    hidden: int
    intermediate: int


@dataclass(frozen=True)
class ExpertPiece:
    module: str
    part: str  # gate | up | down (one expert) or gate_up | down (all experts, fused)
    index: int | None  # expert index, None for a fused tensor of every expert


def resolve_checkpoint_dir(source: str) -> Path:
    """A local folder as is; a Hugging Face id through the hub's local cache (downloading what is missing)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.safetensors", *SIDE_FILE_PATTERNS]))


def load_config(checkpoint_dir: Path | str) -> PretrainedConfig:
    return AutoConfig.from_pretrained(checkpoint_dir)


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The model with parameters on the meta device (no memory) and real buffers (rotary tables)."""
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def find_fused_experts(model: torch.nn.Module) -> dict[str, ExpertsModuleInfo]:
    """Modules that hold every expert of a layer as 3D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]."""
    found = {}
    for name, module in model.named_modules():
        gate_up = getattr(module, "gate_up_proj", None)
        down = getattr(module, "down_proj", None)
        if isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gate_up.dim() == 3:
            experts, double_intermediate, hidden = gate_up.shape
            found[name] = ExpertsModuleInfo(name, experts, hidden, double_intermediate // 2)
    return found


def require_fused_experts(model: torch.nn.Module, config: PretrainedConfig) -> dict[str, ExpertsModuleInfo]:
    found = find_fused_experts(model)
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({config.model_type}) has no fused mixture-of-experts layers; "
            "serve it with OFFLOAD=none"
        )
    return found


def weight_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint_dir / name for name in names]
    single = checkpoint_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no safetensors weights in {checkpoint_dir} (only .safetensors checkpoints load)")


def fingerprint(checkpoint_dir: Path) -> str:
    """Names, sizes and modification times of the weights and config: changes when the checkpoint does."""
    files = [*weight_files(checkpoint_dir), checkpoint_dir / "config.json"]
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


def model_key(checkpoint_key: str) -> str:
    for old, new in _RENAMES:
        checkpoint_key = checkpoint_key.replace(old, new)
    return checkpoint_key


def classify(key: str, experts_modules: dict[str, ExpertsModuleInfo]) -> ExpertPiece | None:
    """The expert piece a (renamed) checkpoint key holds, or None for a resident weight."""
    match = _PER_EXPERT_KEY.match(key)
    if match and match["module"] in experts_modules and match["part"] in _EXPERT_PART:
        return ExpertPiece(match["module"], _EXPERT_PART[match["part"]], int(match["index"]))
    match = _FUSED_KEY.match(key)
    if match and match["module"] in experts_modules:
        return ExpertPiece(match["module"], match["part"].removesuffix("_proj"), None)
    return None
