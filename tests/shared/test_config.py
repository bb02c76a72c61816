import pytest
from pydantic import ValidationError

from shared.config import Settings


def test_visibility_timeout_must_outlive_the_longest_job():
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT_S"):
        Settings(job_timeout_s=4000, visibility_timeout_s=3600, _env_file=None)


def test_default_max_tokens_must_fit_the_limit():
    with pytest.raises(ValidationError, match="MAX_TOKENS_DEFAULT"):
        Settings(max_tokens_default=500, max_tokens_limit=100, _env_file=None)


def test_heartbeats_must_come_more_often_than_a_worker_is_declared_dead():
    with pytest.raises(ValidationError, match="HEARTBEAT_STALE_S"):
        Settings(heartbeat_interval_s=5, heartbeat_stale_s=5, _env_file=None)


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("MAX_QUEUE_DEPTH", "7")
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6380/2")
    settings = Settings(_env_file=None)
    assert settings.max_queue_depth == 7 and settings.redis_url == "redis://elsewhere:6380/2"


def test_the_api_side_settings_hold_nothing_of_the_engine():
    """The model, device and offload settings are the worker's alone (worker/settings.py and OffloadConfig)."""
    assert not {"model_id", "device", "offload", "gpu_memory_gb", "expert_quant"} & set(Settings.model_fields)
