"""Which model names requests may ask for: the model the ready workers loaded, and SERVED_MODEL_ALIASES."""

from dataclasses import dataclass

from api.errors import APIError
from api.services.fleet import FleetReader
from shared.config import Settings
from shared.schemas import ErrorType


@dataclass(frozen=True)
class ServedModel:
    id: str
    created: int  # when a worker loaded it (epoch seconds)
    owned_by: str


def _owner(model_id: str) -> str:
    """A Hugging Face id's organisation ("HuggingFaceTB/SmolLM2-135M" -> "HuggingFaceTB"); else this service."""
    return model_id.split("/", 1)[0] if "/" in model_id else "moeserve"


async def served_models(fleet: FleetReader, settings: Settings) -> list[ServedModel]:
    """Ready workers' models (the earliest load of each), then the aliases under the first one's date."""
    loaded: dict[str, ServedModel] = {}
    for worker in sorted((await fleet.read()).ready, key=lambda worker: worker.started_at):
        loaded.setdefault(worker.model, ServedModel(worker.model, int(worker.started_at), _owner(worker.model)))
    models = list(loaded.values())
    if models:
        models += [
            ServedModel(alias, models[0].created, "moeserve")
            for alias in settings.served_model_aliases
            if alias not in loaded
        ]
    return models


async def check_model(fleet: FleetReader, settings: Settings, requested: str) -> None:
    """404 `model_not_found` unless a ready worker serves `requested` (or it is an alias); 503 with none ready."""
    fleet_now = await fleet.read()
    if not fleet_now.ready:
        raise APIError(
            503,
            ErrorType.MODEL_NOT_READY,
            f"model not ready: {fleet_now.not_ready_reason()}",
            headers={"Retry-After": "5"},
        )
    loaded = sorted({worker.model for worker in fleet_now.ready})
    if requested not in loaded and requested not in settings.served_model_aliases:
        names = ", ".join(f"'{name}'" for name in [*loaded, *settings.served_model_aliases])
        raise APIError(
            404,
            ErrorType.NOT_FOUND,
            f"the model '{requested}' does not exist; this service serves {names}",
            param="model",
            code="model_not_found",
        )
