"""Chat messages (system, user and assistant turns of text and image parts, in order) through
a checkpoint's own chat template, tokenised so that no text can forge a special token.

`ChatMessage(role, parts)`: `parts` is a tuple of text strings and `IMAGE` (an image's place);
an OpenAI-style client's message list maps onto it one to one. `encode_messages(template,
messages, image_tokens)` renders the whole list with the template's own `render_messages`
(npu/text/template.py for InternVL's named templates and Qwen2 ChatML, npu/text/jinja_template.py
for a checkpoint's Jinja template), every text replaced by a stand-in while it renders; the
rendered text is then cut at the stand-ins: the template's own pieces are tokenised with
special tokens, each text as plain text (`parse_special=False`). The same message list gives
the same ids whatever came before it, so a longer conversation's ids start with a shorter
one's (prefix reuse relies on it).

How parts become a turn's content (`message_content`): an image is InternVL's block
(`<img>` + N x `<IMG_CONTEXT>` + `</img>\\n`); images that open a message and are followed by
one text are written as InternVL writes several images (`Image-1: <img>...`), so a message
"images, then the question" renders exactly as `ChatTemplate.render(question, n, ...)`;
a text followed by another part is separated from it by a newline. Several system messages
become one system prompt, joined by newlines (the templates have one system turn).

Knows nothing of images' pixels, HTTP or the engine: ids only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

IMAGE = None  # a part that is an image
Role = Literal["system", "user", "assistant"]
ROLES = ("system", "user", "assistant")

_STAND_IN = "\ue00d{}\ue00d"
_STAND_IN_RE = re.compile("\ue00d([0-9]+)\ue00d")


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    parts: tuple[str | None, ...]  # text, or IMAGE (None) where an image goes

    @property
    def num_images(self) -> int:
        return sum(part is IMAGE for part in self.parts)

    @property
    def text(self) -> str:
        """The message's texts joined by newlines (images left out)."""
        return "\n".join(part for part in self.parts if part is not IMAGE)


def message_content(parts: Sequence[str | None], blocks: Callable[[int], str]) -> str:
    """One turn's content as text: texts and image blocks (`blocks(n)`: n images' blocks) in order."""
    leading = 0
    while leading < len(parts) and parts[leading] is IMAGE:
        leading += 1
    if leading and leading == len(parts) - 1:  # images, then the question: InternVL's own form
        return blocks(leading) + parts[-1]
    pieces: list[str] = []
    for k, part in enumerate(parts):
        if part is IMAGE:
            pieces.append(blocks(1))
        else:
            pieces.append(part + ("\n" if k + 1 < len(parts) else ""))
    return "".join(pieces)


def merge_system(messages: Sequence[ChatMessage]) -> tuple[str | None, list[ChatMessage]]:
    """(the system prompt, None when no message sets one; the other messages in order)."""
    system = [m.text for m in messages if m.role == "system"]
    return ("\n".join(system) if system else None), [m for m in messages if m.role != "system"]


def encode_messages(template: Any, messages: Sequence[ChatMessage], image_tokens: int) -> list[int]:
    """Token ids of `messages` rendered by `template` with the assistant's turn opened (when
    the last message is the user's). ValueError when the template cannot render them."""
    texts: list[str] = []

    def stand_in(part: str | None) -> str | None:
        if part is IMAGE:
            return IMAGE
        texts.append(part)
        return _STAND_IN.format(len(texts) - 1)

    replaced = [ChatMessage(m.role, tuple(stand_in(p) for p in m.parts)) for m in messages]
    rendered = template.render_messages(replaced, image_tokens)
    tokenizer = template.tokenizer
    ids: list[int] = []
    position = 0
    for match in _STAND_IN_RE.finditer(rendered):
        if match.start() > position:
            ids += tokenizer.encode(rendered[position:match.start()])
        ids += tokenizer.encode(texts[int(match.group(1))], parse_special=False)
        position = match.end()
    if position < len(rendered):
        ids += tokenizer.encode(rendered[position:])
    return ids
