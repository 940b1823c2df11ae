"""Where config values come from, and where an error should point.

`load_config` (daemon/config/) merges layers: the TOML file, then `VLMD_` environment
variables, then overrides. Each layer is a nested dict plus its provenance: key path ->
"file:line", "env NAME" or "override". Pydantic errors are turned into `ConfigIssue`s
located with that provenance, so every message names the place to fix.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from daemon.config.toml_text import line_for, toml_key_lines

ENV_PREFIX = "VLMD_"
Key = tuple[str, ...]
Layer = tuple[dict, dict[Key, str]]  # (values, provenance)


class ConfigIssue(NamedTuple):
    location: str  # "vlmd.toml:12 mqtt.keepalive_s", "env VLMD_MQTT__BROKER mqtt.broker"
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class ConfigError(Exception):
    """Invalid configuration; `issues` lists every problem found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


def file_layer(path: Path, path_keys: Collection[Key] = ()) -> Layer:
    """The TOML file's values; relative paths under `path_keys` become relative to the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(str(path), f"cannot read the config file: {exc}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue(str(path), f"not valid TOML: {exc}")]) from None
    lines = toml_key_lines(text)
    sources = {}
    for key, value in leaves(data):
        if key in path_keys and isinstance(value, str) and value and not value.startswith("$"):
            set_key(data, key, str(path.parent / value))  # a no-op for absolute paths
        line = line_for(key, lines)
        sources[key] = f"{path}:{line}" if line else str(path)
    return data, sources


def env_key(name: str, sections: Collection[str]) -> Key | None:
    """`VLMD_MQTT__BROKER` -> ("mqtt", "broker"); None when not under a config section."""
    key = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
    return key if key[0] in sections else None


def env_layer(env: Mapping[str, str], model: type[BaseModel]) -> tuple[dict, dict[Key, str], dict[Key, ConfigIssue]]:
    """`VLMD_` variables under `model`'s sections, each parsed by its field's type.

    Environment values are text, and pydantic's strict mode accepts no text for a bool
    or a number; so each one is parsed here, explicitly: `true`/`false` for bools,
    decimal integers, decimal floats; other fields keep the text. A value that does
    not parse is an issue naming the variable, keyed by its key path (its text stays in
    the layer, so pydantic still checks the rest of that path, e.g. a camera name, and
    the caller drops pydantic's own message for the key); a key that is no field is left
    for pydantic to report.
    """
    data: dict = {}
    sources: dict[Key, str] = {}
    issues: dict[Key, ConfigIssue] = {}
    for name in sorted(env):
        key = env_key(name, model.model_fields) if name.startswith(ENV_PREFIX) else None
        if key is None:
            continue
        sources[key] = f"env {name}"
        value = env[name]
        try:
            value = parse_env_value(value, field_type(model, key))
        except ValueError as exc:
            issues[key] = located(key, sources, str(exc))
        set_key(data, key, value)
    return data, sources, issues


_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|nan)", re.IGNORECASE)


def parse_env_value(text: str, annotation: Any) -> Any:
    """`text` as a value of `annotation` (bool, int, float, or anything else as text)."""
    allowed = _union_members(annotation)
    if text == "" and type(None) in allowed:
        return text  # the fields' own validators turn "" into None
    if bool in allowed:
        if text in ("true", "false"):
            return text == "true"
        raise ValueError(f"expected true or false, got {text!r}")
    if int in allowed:
        if _INT.fullmatch(text):
            return int(text)
        raise ValueError(f"expected an integer, got {text!r}")
    if float in allowed:
        if _FLOAT.fullmatch(text):
            return float(text)  # nan and inf parse, then the model refuses them by name
        raise ValueError(f"expected a number, got {text!r}")
    return text


def field_type(model: type[BaseModel], key: Key) -> Any:
    """The annotation of the field at `key` (through nested models and dict values); None if no such field."""
    annotation: Any = model
    parts = list(key)
    while parts:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(parts.pop(0))
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(annotation) is dict:
            parts.pop(0)  # the dict's key, e.g. a camera name
            annotation = typing.get_args(annotation)[1]
        else:
            return None  # deeper than a leaf: pydantic reports it
    return annotation


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def error_key(error: dict) -> Key:
    """The key path a pydantic error is about (a dict key's error is about that entry)."""
    return tuple(str(part) for part in error["loc"] if part != "[key]")


def issue_from_pydantic(error: dict, provenance: dict[Key, str]) -> ConfigIssue:
    key = error_key(error)
    message = error["msg"].removeprefix("Value error, ")
    secret = any("password" in part for part in key)
    if error["type"] not in ("missing", "extra_forbidden", "value_error") and not secret and not isinstance(error.get("input"), dict):
        message += f" (got {error['input']!r})"
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return located(key, provenance, message)


def located(key: Key, provenance: dict[Key, str], message: str) -> ConfigIssue:
    dotted = ".".join(key) or "(top level)"
    source = provenance.get(key)
    if source is None:  # a whole section failed: name the sources of its keys
        below = sorted({src for k, src in provenance.items() if k[: len(key)] == key})
        above = [provenance[key[:n]] for n in range(len(key) - 1, 0, -1) if key[:n] in provenance]
        source = ", ".join(below) if below else (above[0] if above else "default")
    return ConfigIssue(f"{source} {dotted}", message)


def leaves(data: dict, prefix: Key = ()) -> list[tuple[Key, Any]]:
    out = []
    for name, value in data.items():
        key = (*prefix, str(name))
        out.extend(leaves(value, key) if isinstance(value, dict) and value else [(key, value)])
    return out


def set_key(data: dict, key: Key, value: Any) -> None:
    for part in key[:-1]:
        child = data.get(part)
        if not isinstance(child, dict):  # VLMD_MQTT=x then VLMD_MQTT__BROKER=y: the table wins
            child = data[part] = {}
        data = child
    data[key[-1]] = value


def deep_merge(into: dict, data: dict) -> None:
    for name, value in data.items():
        if isinstance(value, dict) and isinstance(into.get(name), dict):
            deep_merge(into[name], value)
        else:
            into[name] = value
