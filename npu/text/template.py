"""Chat templates: the prompt text InternVL2-family checkpoints were trained on.

The template is chosen by the checkpoint's `template` field (InternVL's conversation
names). All InternVL templates use the MPT separator style:

    system_template(system) + sep + user_role + user_message + sep + assistant_role

Known names:

- `Hermes-2` (InternVL2-1B/-4B...), `internlm2-chat` (InternVL2-2B/-8B...): ChatML tags,
  `<|im_end|>` as separator with no newline after it, InternVL2's own system message;
- `internvl2_5` (InternVL2.5 and InternVL3): ChatML tags, `<|im_end|>\n` as separator,
  the InternVL2.5 system message;
- `phi3-chat` (InternVL2-4B): `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`.

A checkpoint without a `template` field gets the Jinja chat template it carries
(npu/text/jinja_template.py; npu/text/chat_templates.py says where it is looked for), and
one with neither (a text-only Qwen2-Instruct checkpoint, the demo model) Qwen2's ChatML:
"You are a helpful assistant." and `<|im_end|>\n`.

The system message is the explicit `system` argument, else config `system_message`
(InternVL honours it when present), else the template's own.

The user turn carries the images before the question, in InternVL's form: one image is
`<img>` + N x `<IMG_CONTEXT>` + `</img>\\n`; several are numbered,
`Image-1: <img>...</img>\\nImage-2: <img>...</img>\\n`.

Token ids (stop tokens, `<IMG_CONTEXT>`) are read from the tokenizer, never hard-coded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from npu.families.base import ImageTags
from npu.text.messages import ChatMessage, merge_system, message_content
from npu.text.tokenizer import Tokenizer

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
INTERNVL_TAGS = ImageTags(IMG_START, IMG_CONTEXT, IMG_END)
_SPECIAL_RE = re.compile(r"<[^<>\s]+>")  # one special token of a tag
# Tokens that end a turn whichever template is in use, when the tokenizer has them.
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|im_end|>")

INTERNVL2_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                    "是一个有用无害的人工智能助手。")
INTERNVL2_5_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
                      "联合开发的多模态大语言模型。")
QWEN2_SYSTEM = "You are a helpful assistant."
QWEN2_CHATML = "qwen2-chatml"


@dataclass(frozen=True)
class TemplateSpec:
    """One conversation format (MPT separator style)."""

    name: str
    system_template: str  # contains "{system}"
    system_message: str
    user_role: str
    assistant_role: str
    sep: str


TEMPLATES: dict[str, TemplateSpec] = {
    spec.name: spec for spec in (
        TemplateSpec("Hermes-2", "<|im_start|>system\n{system}", INTERNVL2_SYSTEM,
                     "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
        TemplateSpec("internlm2-chat", "<|im_start|>system\n{system}", INTERNVL2_SYSTEM,
                     "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
        TemplateSpec("internvl2_5", "<|im_start|>system\n{system}", INTERNVL2_5_SYSTEM,
                     "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"),
        TemplateSpec("phi3-chat", "<|system|>\n{system}", INTERNVL2_SYSTEM,
                     "<|user|>\n", "<|assistant|>\n", "<|end|>"),
        TemplateSpec(QWEN2_CHATML, "<|im_start|>system\n{system}", QWEN2_SYSTEM,
                     "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"),
    )
}


class Turn(NamedTuple):
    """One turn of a conversation: the user's question, how many images it carries (placed
    before the question, as in a single prompt) and the assistant's answer (None for the
    turn being asked)."""

    question: str
    num_images: int = 0
    answer: str | None = None


@dataclass(frozen=True)
class PromptIds:
    """A tokenised prompt. `ids[:num_prefix_ids]` encodes `template.prefix(...)` exactly,
    so a KV snapshot of the prefix stays valid whatever question follows."""

    ids: list[int]
    num_prefix_ids: int


class ChatTemplate:
    """Renders and tokenises prompts for one checkpoint."""

    def __init__(self, spec: TemplateSpec, tokenizer: Tokenizer, system_message: str | None = None,
                 image_tags: ImageTags | None = None):
        self.spec = spec
        self.image_tags = image_tags or INTERNVL_TAGS  # how the model family marks an image (npu/families/)
        self.name = spec.name
        self.tokenizer = tokenizer
        self.system_message = spec.system_message if system_message is None else system_message
        self.stop_ids = _stop_ids(spec, tokenizer)
        self.image_context_id = tokenizer.token_id(self.image_tags.token)
        self._image_tags_ok = tags_known(self.image_tags, tokenizer)

    @classmethod
    def from_checkpoint(cls, config: dict[str, Any], tokenizer: Tokenizer,
                        image_tags: ImageTags | None = None) -> ChatTemplate:
        """The template named by `config["template"]`, Qwen2 ChatML when there is none."""
        name = config.get("template") or QWEN2_CHATML
        spec = TEMPLATES.get(name)
        if spec is None:
            known = ", ".join(sorted(TEMPLATES))
            raise ValueError(f"unknown chat template {name!r} in config.json; known: {known}")
        return cls(spec, tokenizer, config.get("system_message"), image_tags)

    # -- text ----------------------------------------------------------------------------

    def prefix(self, num_images: int, image_tokens: int, system: str | None = None) -> str:
        """Everything before the question: system turn, user role, image blocks."""
        spec = self.spec
        system_text = spec.system_template.format(
            system=self.system_message if system is None else system)
        return system_text + spec.sep + spec.user_role + self.image_blocks(num_images, image_tokens)

    def suffix(self) -> str:
        """Everything after the question: end of the user turn, assistant role."""
        return self.spec.sep + self.spec.assistant_role

    def render(self, question: str, num_images: int, image_tokens: int,
               system: str | None = None) -> str:
        return self.prefix(num_images, image_tokens, system) + question + self.suffix()

    def render_conversation(self, turns: Sequence[Turn], image_tokens: int, system: str | None = None) -> str:
        """A conversation as InternVL renders its history (MPT separator style): the system
        turn, then per turn user role + image blocks + question + sep + assistant role, and
        for every answered turn its answer + sep. With one unanswered last turn it is the
        prompt for that turn; `render` is the one-turn case."""
        spec = self.spec
        text = spec.system_template.format(system=self.system_message if system is None else system) + spec.sep
        for turn in turns:
            text += spec.user_role + self.image_blocks(turn.num_images, image_tokens) + turn.question + self.suffix()
            if turn.answer is not None:
                text += turn.answer + spec.sep
        return text

    def render_messages(self, messages: Sequence[ChatMessage], image_tokens: int) -> str:
        """A chat's messages in this template's form (npu/text/messages.py): the system turn
        (the messages' system prompt, else the template's own), then each user or assistant
        turn with its parts in order; the assistant's turn opened when the last is the user's."""
        spec = self.spec
        system, turns = merge_system(messages)
        text = spec.system_template.format(system=self.system_message if system is None else system) + spec.sep
        for message in turns:
            role = spec.user_role if message.role == "user" else spec.assistant_role
            text += role + message_content(message.parts, lambda n: self.image_blocks(n, image_tokens)) + spec.sep
        if turns and turns[-1].role == "user":
            text += spec.assistant_role
        return text

    def image_blocks(self, num_images: int, image_tokens: int) -> str:
        return image_blocks(num_images, image_tokens, self._image_tags_ok, self.image_tags)

    # -- ids -----------------------------------------------------------------------------

    def encode_prompt(self, question: str, num_images: int, image_tokens: int,
                      system: str | None = None) -> PromptIds:
        """Token ids of `render(...)`, tokenised in three parts.

        The question is encoded with special tokens as plain text (user text cannot forge
        `<IMG_CONTEXT>` or end the turn), and the parts are encoded separately so the
        prefix ids do not depend on the question. For ordinary questions the result equals
        `tokenizer.encode(render(...))`.
        """
        return encode_parts(self.tokenizer, self.prefix(num_images, image_tokens, system), question, self.suffix())


def encode_parts(tokenizer: Tokenizer, before: str, question: str, after: str) -> PromptIds:
    """Ids of `before + question + after`, the question encoded as plain text, and how many
    ids come before it (independent of the question).

    Spaces that end `before` are encoded with the question: a byte-level BPE joins a space to
    the word after it, so "User: " + "And" is "User", ":", " And" when the whole text is
    tokenised (as transformers does), never a lone " " (SmolVLM's template writes "User: "
    before a text-only question; InternVL's end their prefixes with a newline).
    """
    kept = before.rstrip(" ")
    prefix_ids = tokenizer.encode(kept)
    question_ids = tokenizer.encode(before[len(kept):] + question, parse_special=False)
    return PromptIds(prefix_ids + question_ids + tokenizer.encode(after), len(prefix_ids))


def tags_known(tags: ImageTags, tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer has every special token the (non-empty) tags are made of (a tag may
    be several: SmolVLM's start is `<fake_token_around_image><global-img>`)."""
    names = [name for tag in (tags.start, tags.end, tags.token) if tag for name in _SPECIAL_RE.findall(tag) or [tag]]
    return all(tokenizer.token_id(name) is not None for name in names)


def image_blocks(num_images: int, image_tokens: int, tags_ok: bool = True, tags: ImageTags | None = None) -> str:
    """InternVL's image blocks before a question: `<img>` + N x `<IMG_CONTEXT>` + `</img>\\n`,
    numbered `Image-i: ` when there are several (another family's `tags`: its start, token and
    end, a newline after each block when `tags.newline`). ValueError for impossible counts or when
    the tokenizer lacks the image tags (`tags_ok` False)."""
    tags = tags or INTERNVL_TAGS
    if num_images < 0 or image_tokens < 0:
        raise ValueError(f"num_images ({num_images}) and image_tokens ({image_tokens}) must be >= 0")
    if num_images == 0:
        return ""
    if not tags_ok:
        raise ValueError(f"the tokenizer lacks {tags.start}, {tags.end} or {tags.token}: this model cannot take images")
    if image_tokens == 0:
        raise ValueError("image_tokens must be > 0 when there are images")
    block = tags.start + tags.token * image_tokens + tags.end + ("\n" if tags.newline else "")
    if num_images == 1:
        return block
    return "".join(f"Image-{i}: {block}" for i in range(1, num_images + 1))


def _stop_ids(spec: TemplateSpec, tokenizer: Tokenizer) -> frozenset[int]:
    """The separator token (which must exist) and whichever end-of-text tokens exist."""
    separator = spec.sep.strip()
    if tokenizer.token_id(separator) is None:
        raise ValueError(f"template {spec.name!r} ends turns with {separator!r}, "
                         "which the tokenizer does not have as a token")
    ids = (tokenizer.token_id(name) for name in (separator, *END_OF_TEXT_TOKENS))
    return frozenset(i for i in ids if i is not None)
