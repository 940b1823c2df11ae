"""What goes into the engine and what comes out: per-request options (`GenerationOptions`),
the token events a generation yields (`TokenEvent`, then one `DoneEvent`), and `EngineLike`,
the protocol callers (the daemon's worker, tests' fakes) type the engine with.

Plain data: knows nothing of graphs, the KV cache, MQTT or HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from npu.engine.prompt import Prompt
from npu.engine.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationOptions:
    """Per-request generation settings. temperature 0 is greedy (the default)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # Keep generating through stop tokens (parity tests and benchmarks want exact lengths).
    ignore_stop: bool = False
    # A normalised typed-answer format (protocol/formats.py): the answer is decoded to fit it,
    # and the question gets the format's hint sentence (npu.engine.formats).
    format: dict[str, Any] | None = None
    # The answer ends before the first of these strings (which is not sent): npu.engine.stops.
    stop: tuple[str, ...] = ()
    # Any JSON Schema, as an OpenAI client's response_format carries it (`json_schema`, strict
    # or not; `{"type": "object"}` for `json_object`): the answer is JSON that validates
    # against it; the prompt is left as it is. Exclusive with `format`.
    json_schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.format is not None and self.json_schema is not None:
            raise ValueError("format and json_schema exclude each other")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError(f"json_schema must be a JSON object (a dict), got {type(self.json_schema).__name__}")
        self.sampling_params()  # SamplingParams raises ValueError for a bad value

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, seed=self.seed)

    @property
    def is_plain_greedy(self) -> bool:
        return self.temperature == 0 and self.repetition_penalty == 1.0



@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    delta: str  # UTF-8-safe text this token completes; may be ""
    index: int  # 0-based position in the answer


@dataclass(frozen=True)
class DoneEvent:
    """The last event. `text` is exactly every delta joined: a character the answer stopped
    inside (whose first bytes the detokenizer held back) is dropped, never a U+FFFD."""

    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int  # answer tokens emitted (a stop token is not counted)
    timings: dict[str, Any] = field(default_factory=dict)
    # Fields the final message adds: value and confidence of a typed answer, notes.
    extra: dict[str, Any] = field(default_factory=dict)


Event = TokenEvent | DoneEvent


class EngineLike(Protocol):
    """What a caller of the engine relies on (the daemon's worker; tests drive it with fakes)."""

    def generate(self, prompt: Prompt, options: GenerationOptions | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[Event]: ...

    def forget_conversation(self, conversation_id: str, owner: str | None = None) -> bool: ...

    def conversation_stats(self) -> dict[str, int]: ...

    def model_summary(self) -> dict[str, str | int | None]: ...  # the service's start line and stats
