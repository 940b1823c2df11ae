"""The JSON Schema of every payload (what `vlmd schema` writes into docs/schema/)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from protocol.payloads import AnswerChunk, AnswerFinal, AskRequest, CancelRequest, Caption, CaptionChunk, ErrorMessage, Stats
from protocol.watches import WatchDefinition, WatchEvent, WatchState

INBOUND_MODELS: tuple[type[BaseModel], ...] = (AskRequest, CancelRequest, WatchDefinition)
OUTBOUND_MODELS: tuple[type[BaseModel], ...] = (
    AnswerChunk, AnswerFinal, Caption, CaptionChunk, ErrorMessage, Stats, WatchState, WatchEvent,
)


def json_schemas() -> dict[str, dict[str, Any]]:
    """`{ModelName: JSON Schema}` of every payload, as written by `vlmd schema`."""
    schemas: dict[str, dict[str, Any]] = {}
    for model in INBOUND_MODELS:
        schemas[model.__name__] = model.model_json_schema(mode="validation")
    for model in OUTBOUND_MODELS:
        schemas[model.__name__] = model.model_json_schema(mode="serialization")
    return schemas
