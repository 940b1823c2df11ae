"""Where a checkpoint's prompt format comes from, and the template object that renders it.

`find_chat_template(directories)` looks for a Jinja chat template where transformers
keeps one, in this order per directory: `chat_template.jinja` (what transformers saves
since 4.43, for processors and tokenizers), the legacy processor file
`chat_template.json` (`{"chat_template": ...}`), `chat_template` in
processor_config.json or preprocessor_config.json, then in tokenizer_config.json (a
string, or a list of named templates whose "default" is used).

`template_for(config, tokenizer, chat_template)` is the order vlmd follows (the layout
decides what it passes, npu/board/layout.py):

1. the checkpoint's own `template` field (InternVL's conversation names, built in:
   npu/text/template.py);
2. else the Jinja chat template the checkpoint carries (npu/text/jinja_template.py);
3. else Qwen2 ChatML (a text-only Qwen2 checkpoint, vlmd's demo model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from npu.families.base import ImageTags
from npu.text.jinja_template import JinjaChatTemplate
from npu.text.template import ChatTemplate
from npu.text.tokenizer import Tokenizer

_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" and text.strip() else text
    except (OSError, ValueError):
        return None


def _template_in(value: Any) -> str | None:
    """A config's `chat_template`: a string, or [{"name", "template"}, ...] (its "default")."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        default = named.get("default")
        return default if isinstance(default, str) and default.strip() else None
    return None


def find_chat_template(directories: list[Path | None]) -> tuple[str, Path] | None:
    """(template text, the file it came from) for the first directory that carries one."""
    for directory in directories:
        if directory is None or not directory.is_dir():
            continue
        jinja = directory / "chat_template.jinja"
        if jinja.is_file() and (text := _read(jinja)) and text.strip():
            return text, jinja
        legacy = _read(directory / "chat_template.json")
        if isinstance(legacy, dict) and (text := _template_in(legacy.get("chat_template"))):
            return text, directory / "chat_template.json"
        for name in _CONFIG_FILES:
            config = _read(directory / name)
            if isinstance(config, dict) and (text := _template_in(config.get("chat_template"))):
                return text, directory / name
    return None


def template_for(config: dict[str, Any], tokenizer: Tokenizer, chat_template: str | None = None,
                 tokenizer_config: dict[str, Any] | None = None,
                 stop_tokens: tuple[str, ...] = (), image_tags: ImageTags | None = None) -> ChatTemplate | JinjaChatTemplate:
    """The template a checkpoint defines: its `template` field, else `chat_template`
    (Jinja, with `tokenizer_config` for the special tokens it may use), else Qwen2 ChatML."""
    if config.get("template") or not chat_template:
        return ChatTemplate.from_checkpoint(config, tokenizer, image_tags)
    return JinjaChatTemplate(chat_template, tokenizer, tokenizer_config=tokenizer_config,
                             system_message=config.get("system_message"), stop_tokens=stop_tokens, image_tags=image_tags)
