"""What the dialects' request bodies share: strict models, and parameters accepted only where they change nothing."""

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

StrictFloat = Annotated[float, Field(strict=True)]

#: For each such parameter, the values that ask for nothing this service would have to do.
NoOpValues = dict[str, tuple[Any, ...]]


class StrictRequest(BaseModel):
    """An unknown field is a 400, never silently dropped: a typo like "max_token" must not pass."""

    model_config = ConfigDict(extra="forbid")


def unsupported(name: str, why: str = "") -> PydanticCustomError:
    return PydanticCustomError(
        "unsupported_parameter",
        "{name} is not supported by this service{why}",
        {"name": name, "why": f": {why}" if why else ""},
    )


def no_op_only(no_op: NoOpValues) -> Any:
    """A field validator for the parameters of `no_op`: each accepted at one of its no-op values (of the same
    type: `0` is not `False`), else a 400 naming it. Assign it in the class body, after `no_op`."""

    def check(cls: type, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        if not any(value == allowed and type(value) is type(allowed) for allowed in no_op[name]):
            raise unsupported(name)
        return value

    decorate: Callable[[Any], Any] = field_validator(*no_op, mode="after")
    return decorate(classmethod(check))
