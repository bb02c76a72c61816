"""docker-compose.yml's Flower: published on the host's loopback unless told otherwise, and then only behind a
password (its start-up guard run here with sh, as the container runs it)."""

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _flower() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["flower"]


def test_flower_is_published_on_loopback_by_default():
    assert _flower()["ports"] == ["${FLOWER_BIND:-127.0.0.1}:${FLOWER_PORT:-5555}:5555"]
    assert _flower()["environment"]["FLOWER_BIND"] == "${FLOWER_BIND:-127.0.0.1}"


@pytest.mark.parametrize(
    ("bind", "auth", "starts"),
    [("127.0.0.1", "", True), ("0.0.0.0", "", False), ("0.0.0.0", "admin:secret", True)],
)
def test_flower_refuses_another_address_without_a_password(bind, auth, starts):
    shell, flag, script = _flower()["command"]
    script = script.replace("$$", "$").replace("exec celery", "echo started; true")  # compose's escaping undone
    run = subprocess.run(
        [shell, flag, script], env={"FLOWER_BIND": bind, "FLOWER_BASIC_AUTH": auth}, capture_output=True, text=True
    )
    assert (run.returncode == 0 and "started" in run.stdout) is starts
    if not starts:
        assert "needs FLOWER_BASIC_AUTH" in run.stderr
