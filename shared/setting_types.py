"""Field types the settings classes share."""

from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator


def _empty_is_unset(value: object) -> object:
    return None if value == "" else value


#: A path setting that may be left empty (`NAME=` in .env or the environment) to mean "not set".
OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_unset)]
