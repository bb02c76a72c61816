from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.config import Settings


def test_visibility_timeout_must_outlive_the_longest_job():
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT_S"):
        Settings(job_timeout_s=4000, visibility_timeout_s=3600, _env_file=None)


def test_default_max_tokens_must_fit_the_limit():
    with pytest.raises(ValidationError, match="MAX_TOKENS_DEFAULT"):
        Settings(max_tokens_default=500, max_tokens_limit=100, _env_file=None)


def test_gpu_reserve_must_leave_room_for_weights():
    with pytest.raises(ValidationError, match="GPU_RESERVE_GB"):
        Settings(gpu_memory_gb=2, gpu_reserve_gb=2, _env_file=None)
    assert Settings(gpu_memory_gb=0, gpu_reserve_gb=2, _env_file=None).gpu_reserve_gb == 2  # 0 = whole GPU


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("MODEL_ID", "Qwen/Qwen3-Next-80B-A3B-Instruct")
    monkeypatch.setenv("MAX_QUEUE_DEPTH", "7")
    settings = Settings(_env_file=None)
    assert settings.model_id == "Qwen/Qwen3-Next-80B-A3B-Instruct" and not settings.is_bundled_model
    assert settings.max_queue_depth == 7


def test_env_example_lists_every_setting():
    example = Path(__file__).parents[2] / ".env.example"
    lines = example.read_text().splitlines()
    names = {line.split("=", 1)[0] for line in lines if "=" in line and not line.startswith("#")}
    assert names == {name.upper() for name in Settings.model_fields}


def test_model_cache_dir_expands_home(monkeypatch):
    monkeypatch.setenv("MODEL_CACHE_DIR", "~/models")
    assert "~" not in str(Settings(_env_file=None).model_cache_dir)


def test_an_empty_compile_cache_dir_is_unset(monkeypatch):
    monkeypatch.setenv("COMPILE_CACHE_DIR", "")
    assert Settings(_env_file=None).compile_cache_dir is None
    monkeypatch.setenv("COMPILE_CACHE_DIR", "~/compiled")
    assert Settings(_env_file=None).compile_cache_dir == Path("~/compiled").expanduser()
