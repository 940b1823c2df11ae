"""What a request asks for, and how it becomes cache rows: the prompt, its token ids, the
rows its images' features go to, and the errors a request can be refused with.

The error tree: `EngineError` (code `engine_error`: the model runtime failed) with
`NumericError` (NaN or infinite logits); `RequestError`, the request itself cannot be
served by this model (a refusal before prefill, never an engine failure): `PromptTooLong`,
`ImageError`, `UnsupportedOptions`. Callers tell them apart by type; `.code` is only
the wire code.

`encode_prompt` is the only place a prompt is tokenised; it checks the `<IMG_CONTEXT>`
count against the images (ImageError). `check_fits` refuses a prompt that leaves no
cache row for the answer (PromptTooLong). Both run before any graph call. This module
knows nothing of sessions, buffers or MQTT; `npu.engine` re-exports its public names.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from npu.engine.formats import with_hint
from npu.text.messages import ChatMessage, encode_messages


class EngineError(Exception):
    """A request the engine could not serve; `code` is the wire error code.

    `prompt_tokens` is the prompt's length once it was tokenised (0 before), so a
    failure's final can report the usage so far.
    """

    code = "engine_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.prompt_tokens = 0


class NumericError(EngineError, ValueError):
    """The post graph's chosen logit was NaN or infinite (e.g. a bf16 overflow on the NPU).
    A ValueError too: the sampler's contract for logits it cannot use."""

    code = "numeric_error"


class RequestError(EngineError):
    """What was asked cannot be served by this model: refused before prefill."""

    code = "bad_request"


class PromptTooLong(RequestError):
    code = "too_long"


class ImageError(RequestError):
    code = "bad_image"


class UnsupportedOptions(RequestError):
    """Generation options this model cannot honour (e.g. sampling on a top-k-ids post graph)."""


@dataclass(frozen=True)
class Prompt:
    """A question with its images (RGB uint8 [H, W, 3] each, any size).

    `image_key` names the images' content (e.g. "cam1:42"); prompts with the same key,
    system prompt and template share a KV prefix snapshot, so the key must change when
    the pixels do. None disables prefix reuse. `conversation` names a conversation the
    prompt is the next turn of (npu.engine.conversation); None: a question on its own.

    `messages`, when given, is the whole chat (npu/text/messages.py) and replaces `text` and
    `system`; `images` are then its image parts' pixels, in the order the parts come.
    `conversation_owner` is an opaque string naming who asks (the daemon passes the
    client's reply path): a conversation answers only the owner that opened it.
    """

    text: str
    images: Sequence[np.ndarray] = ()
    image_key: Hashable | None = None
    system: str | None = None
    conversation: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    conversation_owner: str = ""


@dataclass
class EncodedPrompt:
    """A prompt's token ids; `ids[:num_prefix_ids]` never depend on the question."""

    ids: list[int]
    num_prefix_ids: int
    context_rows: np.ndarray  # (num_images * image_tokens,) rows of <IMG_CONTEXT>


def encode_prompt(model: Any, image_tokens: int, prompt: Prompt) -> EncodedPrompt:
    """Tokenise `prompt` with the model's template; ImageError unless every image has
    exactly `image_tokens` `<IMG_CONTEXT>` rows (or the model cannot see at all)."""
    template = model.template
    num_images = len(prompt.images)
    if num_images and (model.vision is None or template.image_context_id is None):
        raise ImageError("this model has no vision graph (or its tokenizer no <IMG_CONTEXT>): ask without an image")
    if prompt.messages:
        if sum(message.num_images for message in prompt.messages) != num_images:
            raise ImageError(f"the messages have {sum(m.num_images for m in prompt.messages)} image parts but"
                             f" {num_images} image(s) came with them")
        try:
            ids, num_prefix_ids = encode_messages(template, prompt.messages, image_tokens), 0
        except ValueError as exc:
            raise RequestError(f"messages: {exc}") from None
    else:
        encoded = template.encode_prompt(prompt.text, num_images, image_tokens, system=prompt.system)
        ids, num_prefix_ids = list(encoded.ids), encoded.num_prefix_ids
    context_id = template.image_context_id
    rows = np.flatnonzero(np.asarray(ids) == context_id) if context_id is not None else np.zeros(0, np.int64)
    if len(rows) != num_images * image_tokens:
        raise ImageError(f"the prompt holds {len(rows)} <IMG_CONTEXT> tokens but {num_images} image(s) of"
                         f" {image_tokens} features each need {num_images * image_tokens}")
    return EncodedPrompt(ids, num_prefix_ids, rows)


def check_fits(encoded: EncodedPrompt, capacity: int) -> None:
    """PromptTooLong unless the prompt and one answer token fit `capacity` cache rows."""
    if len(encoded.ids) + 1 > capacity:
        raise PromptTooLong(
            f"the prompt is {len(encoded.ids)} tokens ({len(encoded.context_rows)} of them image tokens) but the"
            f" KV cache holds {capacity} and one must remain for the answer: shorten the question or send fewer images")


def with_format_hint(prompt: Prompt, schema: dict[str, Any]) -> Prompt:
    """The prompt with a format's sentence added to its question (the last message's last text)."""
    if not prompt.messages:
        return replace(prompt, text=with_hint(prompt.text, schema))
    last = prompt.messages[-1]
    texts = [k for k, part in enumerate(last.parts) if part is not None]
    if not texts:
        return prompt
    parts = list(last.parts)
    parts[texts[-1]] = with_hint(parts[texts[-1]], schema)
    return replace(prompt, messages=(*prompt.messages[:-1], replace(last, parts=tuple(parts))))
