"""The engine and its parts: run state and the generate loop (core), the KV cache, the
prefill plan, follow-up prefixes, prompts and request errors, sampling, bf16 logits.

Callers import the public names from here: `from npu.engine import Engine, Prompt, ...`.
"""

from npu.engine.core import Engine
from npu.engine.events import DoneEvent, EngineLike, Event, GenerationOptions, TokenEvent
from npu.engine.logits import argmax_logits, bf16_order_keys
from npu.engine.prefill import plan_prefill
from npu.engine.prefix import REPLAY_POLICIES
from npu.engine.prompt import (EngineError, ImageError, NumericError, Prompt, PromptTooLong, RequestError,
                               UnsupportedOptions)

__all__ = ["REPLAY_POLICIES", "DoneEvent", "Engine", "EngineError", "EngineLike", "Event", "GenerationOptions",
           "ImageError", "NumericError", "Prompt", "PromptTooLong", "RequestError", "TokenEvent", "UnsupportedOptions",
           "argmax_logits", "bf16_order_keys", "plan_prefill"]
