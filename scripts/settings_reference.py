"""Write `docs/configuration.md` and `.env.example` from the settings classes, where each setting is described once.

python scripts/settings_reference.py          # rewrite both files
python scripts/settings_reference.py --check  # exit 1 if either is out of date (a test runs this)
"""

import argparse
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.config import Settings  # noqa: E402
from worker.settings import EngineSettings, OffloadSettings  # noqa: E402

#: (heading, who reads it, class), in the order the reference lists them.
SECTIONS: tuple[tuple[str, str, type[BaseSettings]], ...] = (
    ("Service", "the API and the worker (`shared/config.py`, `Settings`)", Settings),
    ("Model and engine", "the worker (`worker/settings.py`, `EngineSettings`)", EngineSettings),
    (
        "MoE expert offload",
        "the worker's offload engine (`worker/settings.py`, `OffloadSettings`, read into the engine's `OffloadConfig`)",
        OffloadSettings,
    ),
)
DOC = ROOT / "docs" / "configuration.md"
ENV_EXAMPLE = ROOT / ".env.example"


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    kind: str
    description: str


def env_name(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    """The variable pydantic-settings reads: a string alias as it is, else the class's prefix and the name."""
    if isinstance(field.validation_alias, str):
        return field.validation_alias.upper()
    return (str(cls.model_config.get("env_prefix", "")) + name).upper()


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):  # read back comma-separated
        return ",".join(map(str, value))
    return str(value)


def _kind(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(str(choice) for choice in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_kind(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return getattr(annotation, "__name__", str(annotation)).replace("PosixPath", "path").replace("Path", "path")


def settings_of(cls: type[BaseSettings]) -> list[Setting]:
    found = []
    for name, field in cls.model_fields.items():
        if not field.description:
            raise ValueError(f"{cls.__name__}.{name} has no description")
        found.append(Setting(env_name(cls, name, field), _default(field), _kind(field.annotation), field.description))
    return found


def configuration_md() -> str:
    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable, also read from a `.env` file in the working directory",
        "(`.env.example` lists them all with their defaults). This page is generated from the settings classes",
        "by `python scripts/settings_reference.py`; a test fails when it is out of date.",
        "",
    ]
    for heading, readers, cls in SECTIONS:
        lines += [
            f"## {heading}",
            "",
            f"Read by {readers}.",
            "",
            "| variable | default | values | meaning |",
            "|---|---|---|---|",
        ]
        for setting in settings_of(cls):
            default = f"`{setting.default}`" if setting.default else "(unset)"
            lines.append(f"| `{setting.env}` | {default} | {setting.kind} | {setting.description} |")
        lines.append("")
    return "\n".join(lines)


def env_example() -> str:
    lines = ["# Every setting with its default (docs/configuration.md explains each). Copy to .env to change one."]
    for heading, _, cls in SECTIONS:
        lines += ["", f"# --- {heading} ---"]
        for setting in settings_of(cls):
            lines += [f"# {setting.description}", f"{setting.env}={setting.default}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether the files are up to date")
    args = parser.parse_args()
    stale = []
    for path, text in ((DOC, configuration_md()), (ENV_EXAMPLE, env_example())):
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        sys.stderr.write(f"out of date: {', '.join(map(str, stale))}; run python scripts/settings_reference.py\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
