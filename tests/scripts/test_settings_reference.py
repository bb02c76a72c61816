"""docs/configuration.md and .env.example are generated from the settings classes: they must be current."""

import subprocess
import sys
from pathlib import Path

from scripts import settings_reference

ROOT = Path(__file__).parents[2]


def test_the_configuration_reference_and_env_example_are_up_to_date():
    check = subprocess.run(
        [sys.executable, "scripts/settings_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_every_setting_is_documented_once_under_the_variable_pydantic_reads(monkeypatch):
    documented = [
        setting.env for _, _, cls in settings_reference.SECTIONS for setting in settings_reference.settings_of(cls)
    ]
    assert len(documented) == len(set(documented))  # no variable claimed by two classes
    example = (ROOT / ".env.example").read_text().splitlines()
    assert [line.split("=", 1)[0] for line in example if line and not line.startswith("#")] == documented
    # each name really is the one its class reads (numbers: twice the default, which every check allows)
    for _, _, cls in settings_reference.SECTIONS:
        for name, field in cls.model_fields.items():
            if field.annotation in (int, float):
                env, value = settings_reference.env_name(cls, name, field), 2 * field.default or 1
                monkeypatch.setenv(env, str(value))
                assert getattr(cls(_env_file=None), name) == value, env
                monkeypatch.delenv(env)
