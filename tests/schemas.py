"""JSON Schemas that structured-output tests and bench/format_tokens.py share: Frigate's
review-description schema, built the way Frigate builds it, and a nested one."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Frigate's review-description metadata, written here from the fields and constraints of
# blakeblackshear/frigate frigate/data_processing/post/types.py `ReviewMetadata` at commit
# e3fa70189324e5eb3b1dba756c153f6696f457de; its schema is built as
# frigate/genai/prompts.py `build_review_description_response_format` builds it there
# (model_json_schema(), `time` dropped, `other_concerns` dropped without configured concerns)
# and frigate/genai/plugins/openai.py sends it (strict: additionalProperties false added).
Observation = Annotated[str, StringConstraints(min_length=20, max_length=200)]


class ReviewMetadata(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    observations: list[Observation] = Field(..., min_length=3, max_length=8, description="What was seen, in order.")
    scene: str = Field(min_length=150, max_length=600, description="What happens, start to finish.")
    title: str = Field(max_length=80, description="A title for the activity.")
    shortSummary: str = Field(min_length=70, max_length=140, description="A brief summary.")  # noqa: N815 (Frigate's name)
    confidence: float = Field(ge=0.0, le=1.0, description="Confidence between 0.0 and 1.0.")
    potential_threat_level: int = Field(ge=0, le=2, description="0 normal, 1 suspicious, 2 critical.")
    other_concerns: list[str] | None = Field(default=None, description="Concerns the user listed that are seen.")
    time: str | None = Field(default=None, description="Time of the activity.")


def frigate_review_schema(concerns: list[str]) -> dict:
    schema = ReviewMetadata.model_json_schema()
    schema["properties"].pop("time")
    if not concerns:
        schema["properties"].pop("other_concerns")
    schema["required"] = [name for name in schema.get("required", []) if name in schema["properties"]]
    schema["additionalProperties"] = False  # what Frigate's OpenAI client adds for strict
    return schema


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=12, pattern=r"^[A-Za-z ]+$")
    age: int | None = Field(ge=0, le=120)


class Household(BaseModel):
    model_config = ConfigDict(extra="forbid")

    people: list[Person] = Field(min_length=1, max_length=3)
    pets: list[Annotated[str, StringConstraints(max_length=10)]] = Field(max_length=2)
    address: dict[str, int] | None = None
    mood: str | int


def nested_schema() -> dict:
    return Household.model_json_schema()
