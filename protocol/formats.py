"""Typed answers: the JSON Schema a request's `format` may be, validated and normalised.

Two kinds of format, told apart by their shape:

The flat subset keeps the meaning it has always had (and its refusals):

- `{"type": "boolean"}`: the answer is yes or no (value `true` / `false`);
- `{"type": "integer", "minimum": a, "maximum": b}`: a whole number in [a, b]; missing
  bounds mean the JSON-safe range +-(2^53 - 1);
- `{"type": "number", "minimum": a, "maximum": b}`: a decimal number in [a, b], at most
  `MAX_FRACTION_DIGITS` digits after the point, no exponent; missing bounds mean +-1e15;
- `{"enum": ["red", "green", ...]}` (with or without `"type": "string"`): one of the strings;
- `{"type": "object", "properties": {name: one of the above, ...}, "required": [...]}`:
  a flat JSON object with every property, in the order given. `required` may list
  properties (it must name known ones); every property is always answered, so the
  normalised form lists them all. `additionalProperties` may only be `false`.

`title` and `description` are accepted anywhere and have no effect (schema generators
add them). A flat format normalises to the dict the engine compiles: bounds filled in,
`type` always present except for enums (`{"enum": [...]}`), and `required` listing every
property.

Any other JSON Schema (nested objects, `$defs`/`$ref`, arrays, strings with lengths or
patterns, `anyOf`, a `type` list such as `["string", "null"]`, more than
`MAX_PROPERTIES` properties, ...) normalises to `{"json_schema": schema}`, unchanged: the
answer is JSON that validates against it and `value` is that JSON. Only its shape and
size are checked here (a JSON object within MAX_SCHEMA_CHARS and MAX_SCHEMA_DEPTH, types
that JSON Schema names); whether the engine can compile each keyword is the engine's
answer (npu.engine.constrain refuses an unsupported keyword, naming it).

`parse_format(obj)` accepts both kinds, `parse_flat_format(obj)` only the flat subset
(watches: Home Assistant shows a flat answer as entities). Both raise `FormatError`
whose message starts with the path of the offending keyword (`enum: ...`,
`properties.door.minimum: ...`).

Knows nothing of the engine or MQTT.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_SAFE_INTEGER = 2**53 - 1
MAX_NUMBER = 1e15
MAX_FRACTION_DIGITS = 6
MAX_ENUM_OPTIONS = 64
MAX_OPTION_CHARS = 64
MAX_PROPERTIES = 16
MAX_KEY_CHARS = 64
MAX_SCHEMA_CHARS = 16_384  # a general schema, as compact JSON
MAX_SCHEMA_DEPTH = 32  # nested objects and lists in a general schema
JSON_TYPES = ("null", "boolean", "object", "array", "number", "string", "integer")

_ANNOTATIONS = ("title", "description")
_KEYWORDS = {
    "boolean": {"type"},
    "integer": {"type", "minimum", "maximum"},
    "number": {"type", "minimum", "maximum"},
    "string": {"type", "enum"},
    "enum": {"enum"},
    "object": {"type", "properties", "required", "additionalProperties"},
}
_ALL_KEYWORDS = sorted({k for keys in _KEYWORDS.values() for k in keys} | set(_ANNOTATIONS))
# Text the model must write (options, keys): printable, no control characters.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class FormatError(ValueError):
    """A format the engine cannot decode to; the message names the offending keyword."""


def parse_format(obj: Any) -> dict[str, Any]:
    """Validate a request's `format` and return its normalised form (see the module doc)."""
    if isinstance(obj, dict) and not _flat_shaped(obj):
        return {"json_schema": check_json_schema(obj)}
    return _parse(obj, "", nested=False)


def parse_flat_format(obj: Any) -> dict[str, Any]:
    """Only the flat subset (see the module doc): a general schema is refused."""
    if isinstance(obj, dict) and not _flat_shaped(obj):
        raise FormatError("a watch's format is boolean, integer, number, an enum or a flat object of those")
    return _parse(obj, "", nested=False)


def format_kind(schema: dict[str, Any]) -> str:
    """"boolean", "integer", "number", "enum", "object" or "json" (any other schema) of a normalised format."""
    if "json_schema" in schema:
        return "json"
    return "enum" if "enum" in schema else schema["type"]


def check_json_schema(schema: Any, where: str = "") -> dict[str, Any]:
    """`schema` when it is a JSON Schema object within the size and depth limits, with
    `type`s JSON Schema names; the keywords themselves are the engine's to judge."""
    prefix = f"{where}: " if where else ""
    if not isinstance(schema, dict):
        raise FormatError(f"{prefix}must be a JSON object (a schema), got {_json_type(schema)}")
    try:
        text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{prefix}must be plain JSON: {exc}") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise FormatError(f"{prefix}the schema is {len(text)} characters as JSON, at most {MAX_SCHEMA_CHARS}")
    _check_schema_node(schema, where, 1)
    return schema


def _check_schema_node(node: Any, path: str, depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise FormatError(f"{path or 'schema'}: nested more than {MAX_SCHEMA_DEPTH} levels deep")
    if isinstance(node, list):
        for index, item in enumerate(node):
            _check_schema_node(item, f"{path}[{index}]", depth + 1)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for name in kinds:
        if name not in JSON_TYPES:
            raise FormatError(f"{_at(path, 'type')}: {name!r} is not a JSON Schema type ({', '.join(JSON_TYPES)})")
    for key, value in node.items():
        if not isinstance(key, str):  # pragma: no cover - JSON keys are strings
            raise FormatError(f"{path}: keys must be strings")
        _check_schema_node(value, _at(path, key), depth + 1)


def _flat_shaped(obj: dict[str, Any]) -> bool:
    """True when `obj` is written in the flat subset's shape (its values are then checked
    by the flat rules, with their messages); False sends it to the general schema path."""
    kind = obj.get("type")
    if kind is None:
        if "enum" not in obj:  # {} is refused by the flat rules; anyOf, $ref, ... are schemas
            return not obj.keys() - set(_ANNOTATIONS)
        kind = "enum"
    elif isinstance(kind, list):  # ["string", "null"] and the like
        return False
    elif not isinstance(kind, str):
        return True  # the flat rules say what is wrong with it
    if kind == "string" and "enum" not in obj:
        return False
    if kind not in _KEYWORDS or set(obj) - _KEYWORDS[kind] - set(_ANNOTATIONS):
        return False
    if kind != "object":
        return True
    if "properties" not in obj:
        return False  # {"type": "object"}: any object (OpenAI's json_object), a general schema
    properties = obj.get("properties")
    if not isinstance(properties, dict):
        return True  # the flat rules say what is wrong with it
    if len(properties) > MAX_PROPERTIES or obj.get("additionalProperties", False) is not False:
        return False
    return all(isinstance(sub, dict) and sub.get("type") != "object" and _flat_shaped(sub)
               for sub in properties.values())


def _parse(obj: Any, path: str, nested: bool) -> dict[str, Any]:
    where = f"{path}: " if path else ""
    if not isinstance(obj, dict):
        raise FormatError(f"{where}must be a JSON object (a schema), got {_json_type(obj)}")
    kind = obj.get("type")
    if kind is None:
        if "enum" not in obj:
            raise FormatError(f"{where}needs \"type\" (boolean, integer, number, object) or \"enum\"")
        kind = "enum"
    elif not isinstance(kind, str):
        raise FormatError(f"{_at(path, 'type')}: must be a string, got {_json_type(kind)}")
    elif kind not in _KEYWORDS or kind == "enum":
        raise FormatError(f"{_at(path, 'type')}: unsupported type {kind!r} (supported: boolean, integer, "
                          "number, object, or an enum of strings)")
    for key in obj:
        if key not in _KEYWORDS[kind] and key not in _ANNOTATIONS:
            hint = f" for type {kind}" if key in _ALL_KEYWORDS else f" (supported: {', '.join(_ALL_KEYWORDS)})"
            raise FormatError(f"{_at(path, key)}: unsupported keyword{hint}")
    for key in _ANNOTATIONS:
        if key in obj and not isinstance(obj[key], str):
            raise FormatError(f"{_at(path, key)}: must be a string")
    if kind == "boolean":
        return {"type": "boolean"}
    if kind in ("integer", "number"):
        return _parse_range(obj, path, kind)
    if kind in ("string", "enum"):
        if "enum" not in obj:
            raise FormatError(f"{where}a string format needs \"enum\" (free text needs no format)")
        return {"enum": _parse_enum(obj["enum"], _at(path, "enum"))}
    if nested:
        raise FormatError(f"{_at(path, 'type')}: objects cannot be nested; a property is boolean, integer, "
                          "number or an enum")
    return _parse_object(obj, path)


def _parse_range(obj: dict[str, Any], path: str, kind: str) -> dict[str, Any]:
    limit = MAX_SAFE_INTEGER if kind == "integer" else MAX_NUMBER
    bounds = {}
    for key, default in (("minimum", -limit), ("maximum", limit)):
        value = obj.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FormatError(f"{_at(path, key)}: must be a number, got {_json_type(value)}")
        if not math.isfinite(value):
            raise FormatError(f"{_at(path, key)}: must be finite")
        if kind == "integer" and not float(value).is_integer():
            raise FormatError(f"{_at(path, key)}: an integer format needs whole bounds, got {value}")
        if abs(value) > limit:
            raise FormatError(f"{_at(path, key)}: {value} is beyond +-{limit:g}, the largest {kind} bound supported")
        bounds[key] = int(value) if kind == "integer" else value
    if bounds["minimum"] > bounds["maximum"]:
        raise FormatError(f"{_at(path, 'minimum')}: {bounds['minimum']} is greater than maximum {bounds['maximum']}")
    return {"type": kind, **bounds}


def _parse_enum(options: Any, where: str) -> list[str]:
    if not isinstance(options, list):
        raise FormatError(f"{where}: must be a list of strings, got {_json_type(options)}")
    if not options:
        raise FormatError(f"{where}: must list at least one option")
    if len(options) > MAX_ENUM_OPTIONS:
        raise FormatError(f"{where}: {len(options)} options, at most {MAX_ENUM_OPTIONS} are supported")
    for index, option in enumerate(options):
        _check_text(option, f"{where}[{index}]", MAX_OPTION_CHARS, "an option")
    duplicates = sorted({option for option in options if options.count(option) > 1})
    if duplicates:
        raise FormatError(f"{where}: {duplicates[0]!r} is listed twice")
    return list(options)


def _parse_object(obj: dict[str, Any], path: str) -> dict[str, Any]:
    where = _at(path, "properties")
    properties = obj.get("properties")
    if not isinstance(properties, dict):
        raise FormatError(f"{where}: an object format needs properties (a JSON object), got {_json_type(properties)}")
    if not properties:
        raise FormatError(f"{where}: must name at least one property")
    if len(properties) > MAX_PROPERTIES:
        raise FormatError(f"{where}: {len(properties)} properties, at most {MAX_PROPERTIES} are supported")
    parsed = {}
    for key, schema in properties.items():
        _check_text(key, f"{where}.{key}", MAX_KEY_CHARS, "a property name")
        parsed[key] = _parse(schema, f"{where}.{key}", nested=True)
    required = obj.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        raise FormatError(f"{_at(path, 'required')}: must be a list of property names")
    unknown = [name for name in required if name not in properties]
    if unknown:
        raise FormatError(f"{_at(path, 'required')}: {unknown[0]!r} is not one of the properties")
    if obj.get("additionalProperties", False) is not False:
        raise FormatError(f"{_at(path, 'additionalProperties')}: only false is supported (the answer has exactly "
                          "the listed properties)")
    return {"type": "object", "properties": parsed, "required": list(parsed)}


def _check_text(value: Any, where: str, max_chars: int, what: str) -> None:
    if not isinstance(value, str):
        raise FormatError(f"{where}: {what} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise FormatError(f"{where}: {what} must not be empty or blank")
    if len(value) > max_chars:
        raise FormatError(f"{where}: {what} is {len(value)} characters, at most {max_chars}")
    if _CONTROL_RE.search(value) or value != value.strip():
        raise FormatError(f"{where}: {what} must not hold control characters or start or end with a space")


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__
