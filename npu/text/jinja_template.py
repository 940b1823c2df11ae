"""A checkpoint's own Jinja chat template, rendered the way transformers renders it.

transformers 5.x (utils/chat_template_utils.py, `_cached_compile_jinja_template` and
`render_jinja_template`; processing_utils.py and models/internvl/processing_internvl.py)
renders a chat in an `ImmutableSandboxedEnvironment` with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension and a `{% generation %}` block, a `tojson`
filter that is plain `json.dumps` (no HTML escaping, `ensure_ascii=False`), the globals
`raise_exception(message)` and `strftime_now(format)`, and the variables `messages`,
`add_generation_prompt` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...).
This module does the same, so a transformers-native checkpoint gets exactly its prompt.

Images, as transformers' processors pass them: a template that reads content parts
(`content['type']`) gets each user turn as `[{"type": "image"}, ..., {"type": "text",
"text": question}]`, and every image placeholder it writes (the tokenizer's
`context_image_token`, `<IMG_CONTEXT>`) becomes `<img>` + N x `<IMG_CONTEXT>` + `</img>`
as InternVLProcessor expands it (N = the vision graph's image tokens; one tile). A
template that reads plain string content gets InternVL's own form, the image blocks before
the question (npu/text/template.py `image_blocks`). Placeholders inside user text are
never expanded (they are marked before rendering, as transformers marks control tokens).

The prompt is tokenised in three parts (everything before the question, the question as
plain text, everything after), so prefix ids do not depend on the question, as with the
built-in templates; the parts come from rendering with a sentinel in place of the question.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from npu.families.base import ImageTags
from npu.text.messages import IMAGE, ChatMessage, merge_system, message_content
from npu.text.template import (END_OF_TEXT_TOKENS, IMG_CONTEXT, IMG_END, IMG_START, PromptIds, Turn, encode_parts,
                               image_blocks, tags_known)
from npu.text.tokenizer import Tokenizer

_QUESTION = "\ue00fquestion\ue00f"  # stands for the question while the template renders
_MARK_START, _MARK_END = "\ue000", "\ue001"  # around placeholders that came from user text
_PARTS_RE = re.compile(r"""['"]type['"]|\.type\b""")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_SPLIT_CACHE = 32


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks the span)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationBlock, loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)


def _token_text(value: Any) -> str | None:
    """A tokenizer_config special token: a string or an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class JinjaChatTemplate:
    """Renders and tokenises prompts with a checkpoint's Jinja chat template (the same
    interface as npu.text.template.ChatTemplate)."""

    def __init__(self, source: str, tokenizer: Tokenizer, tokenizer_config: dict[str, Any] | None = None,
                 system_message: str | None = None, stop_tokens: Sequence[str] = (),
                 image_tags: ImageTags | None = None) -> None:
        config = tokenizer_config or {}
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"the checkpoint's chat template does not parse: {exc}") from exc
        self.name = "chat_template"
        self.source = source
        self.tokenizer = tokenizer
        self.system_message = system_message
        self.structured = bool(_PARTS_RE.search(source))
        extra = config.get("extra_special_tokens") if isinstance(config.get("extra_special_tokens"), dict) else {}
        if image_tags is None:  # InternVL's processor tokens, as its tokenizer_config names them
            image_tags = ImageTags(_token_text(extra.get("start_image_token")) or IMG_START,
                                   _token_text(extra.get("context_image_token")) or IMG_CONTEXT,
                                   _token_text(extra.get("end_image_token")) or IMG_END)
        self.image_tags = image_tags
        self.image_token, self.image_start, self.image_end = image_tags.token, image_tags.start, image_tags.end
        self._variables = {key: text for key in _SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key)))}
        self.image_context_id = tokenizer.token_id(self.image_token)
        self._image_tags_ok = tags_known(image_tags, tokenizer)
        stops = (*END_OF_TEXT_TOKENS, *stop_tokens, self._variables.get("eos_token", ""))
        self.stop_ids = frozenset(i for t in stops if t and (i := tokenizer.token_id(t)) is not None)
        if not self.stop_ids:
            raise ValueError("the chat template's tokenizer has no end-of-turn token (<|im_end|>, <|endoftext|>"
                             " or its eos_token): answers could not stop")
        self._splits: OrderedDict[tuple, tuple[str, str]] = OrderedDict()
        self._split(0, 0, None)  # refuse a template that does not render the question as given, now

    # -- rendering -------------------------------------------------------------------------

    def _content(self, text: str, num_images: int, image_tokens: int) -> Any:
        if not self.structured:
            return self.image_blocks(num_images, image_tokens) + text
        return [{"type": "image"}] * num_images + [{"type": "text", "text": self._mark(text)}]

    def _text(self, text: str) -> Any:
        return [{"type": "text", "text": self._mark(text)}] if self.structured else text

    def _mark(self, text: str) -> str:
        text = text.replace(_MARK_START, "").replace(_MARK_END, "")
        return text.replace(self.image_token, _MARK_START + self.image_token + _MARK_END)

    def _messages(self, turns: Sequence[Turn], image_tokens: int, system: str | None) -> list[dict[str, Any]]:
        system = self.system_message if system is None else system
        messages = [] if system is None else [{"role": "system", "content": self._text(system)}]
        for turn in turns:
            messages.append({"role": "user", "content": self._content(turn.question, turn.num_images, image_tokens)})
            if turn.answer is not None:
                messages.append({"role": "assistant", "content": self._text(turn.answer)})
        return messages

    def render_conversation(self, turns: Sequence[Turn], image_tokens: int, system: str | None = None) -> str:
        """The conversation as the template renders it, each image's placeholder expanded;
        the assistant's turn is opened when the last turn is unanswered."""
        if any(turn.num_images for turn in turns):
            self.image_blocks(1, image_tokens)  # the same refusals as the built-in templates
        add_generation_prompt = bool(turns) and turns[-1].answer is None
        return self._render(self._messages(turns, image_tokens, system), add_generation_prompt, image_tokens)

    def render_messages(self, messages: Sequence[ChatMessage], image_tokens: int) -> str:
        """A chat's messages as the template renders them (npu/text/messages.py), parts in
        order (a template that reads parts gets `{"type": "image"}` where each image is);
        the assistant's turn opened when the last message is the user's."""
        system, turns = merge_system(messages)
        system = self.system_message if system is None else system
        listed = [] if system is None else [{"role": "system", "content": self._text(system)}]
        for message in turns:
            if self.structured:
                content: Any = [{"type": "image"} if part is IMAGE else {"type": "text", "text": self._mark(part)}
                                for part in message.parts]
            else:
                content = message_content([p if p is IMAGE else self._mark(p) for p in message.parts],
                                          lambda n: self.image_blocks(n, image_tokens))
            listed.append({"role": message.role, "content": content})
        if any(message.num_images for message in turns):
            self.image_blocks(1, image_tokens)  # the same refusals as the built-in templates
        return self._render(listed, bool(turns) and turns[-1].role == "user", image_tokens)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, image_tokens: int) -> str:
        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._variables)
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise ValueError(f"the checkpoint's chat template refused the conversation: {exc}") from exc
        if self.structured:
            edges = self.image_tags.expand_edges  # else the template writes the start and end tags itself
            block = (self.image_start if edges else "") + self.image_token * image_tokens + (self.image_end if edges else "")
            text = re.sub(f"(?<!{_MARK_START}){re.escape(self.image_token)}", lambda _: block, text)
        return text.replace(_MARK_START, "").replace(_MARK_END, "")

    def render(self, question: str, num_images: int, image_tokens: int, system: str | None = None) -> str:
        return self.render_conversation([Turn(question, num_images)], image_tokens, system)

    def image_blocks(self, num_images: int, image_tokens: int) -> str:
        return image_blocks(num_images, image_tokens, self._image_tags_ok, self.image_tags)

    def _split(self, num_images: int, image_tokens: int, system: str | None) -> tuple[str, str]:
        """(everything before the question, everything after it) for a one-turn prompt."""
        key = (num_images, image_tokens, system)
        if key not in self._splits:
            parts = self.render(_QUESTION, num_images, image_tokens, system).split(_QUESTION)
            if len(parts) != 2:
                raise ValueError("the checkpoint's chat template does not render the question once, as given;"
                                 " name a `template` in config.json or vlmd.toml instead")
            self._splits[key] = (parts[0], parts[1])
            while len(self._splits) > _SPLIT_CACHE:
                self._splits.popitem(last=False)
        self._splits.move_to_end(key)
        return self._splits[key]

    def prefix(self, num_images: int, image_tokens: int, system: str | None = None) -> str:
        return self._split(num_images, image_tokens, system)[0]

    def suffix(self) -> str:
        return self._split(0, 0, None)[1]

    # -- ids -------------------------------------------------------------------------------

    def encode_prompt(self, question: str, num_images: int, image_tokens: int,
                      system: str | None = None) -> PromptIds:
        """Token ids of `render(...)` in three parts: the question encoded as plain text
        (it cannot forge special tokens), the prefix ids independent of it."""
        prefix, suffix = self._split(num_images, image_tokens, system)
        return encode_parts(self.tokenizer, prefix, question, suffix)
