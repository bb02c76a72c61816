from pathlib import Path

from worker.settings import BUNDLED_MODEL_ID, EngineSettings


def test_engine_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("MODEL_ID", "Qwen/Qwen3-Next-80B-A3B-Instruct")
    monkeypatch.setenv("MAX_MODEL_LEN", "8192")
    settings = EngineSettings(_env_file=None)
    assert settings.model_id == "Qwen/Qwen3-Next-80B-A3B-Instruct" and not settings.is_bundled_model
    assert settings.max_model_len == 8192
    assert EngineSettings(_env_file=None, model_id=BUNDLED_MODEL_ID).is_bundled_model


def test_model_cache_dir_expands_home(monkeypatch):
    monkeypatch.setenv("MODEL_CACHE_DIR", "~/models")
    assert EngineSettings(_env_file=None).model_cache_dir == Path("~/models").expanduser()
    monkeypatch.delenv("MODEL_CACHE_DIR")
    assert "~" not in str(EngineSettings(_env_file=None).model_cache_dir)  # the default too


def test_an_empty_compile_cache_dir_means_one_under_the_model_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("COMPILE_CACHE_DIR", "")
    settings = EngineSettings(_env_file=None)
    assert settings.compile_cache_dir is None and settings.compile_dir == tmp_path / "compile"
    monkeypatch.setenv("COMPILE_CACHE_DIR", "~/compiled")
    assert EngineSettings(_env_file=None).compile_dir == Path("~/compiled").expanduser()
