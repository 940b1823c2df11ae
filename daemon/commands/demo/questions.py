"""What the demo model is asked about a scene, in every phrasing it learned, and the one
right answer to each: the oracle that its training, the accuracy script, `vlmd demo` and
the tests share.

Contract:
- `scenes.CAPTION_PROMPTS` ask for `Scene.caption()`; `FORMS[type]` are the phrasings of
  each of `scenes.QUESTION_TYPES` ("{kind}" is a shape kind; "{thing}" a kind, a colour and
  a kind, or a colour and "shape"). A prompt may start lower case, spell "color", and drop
  its final "?" or "." (`variant` draws such spellings).
- Typed answers: for a `format`, vlmd appends one space and a hint to the question
  (npu.engine.formats.format_hint): BOOLEAN_HINT, NUMBER_HINT or "Answer with one of: ...".
  With NUMBER_HINT the count is digits ("2", not "two"); with an enum hint the answer is
  the option that is right.
- Anything else (another subject, another task, a thing that is not a shape) gets
  OUT_OF_WORLD_REPLY, hint or not; so does every prompt asked without an image or about
  several images (the demo knows one scene at a time).
- `answer(scene, prompt)` is the right answer to any prompt, or None where the scene has
  no single right one (the colour of a kind it shows twice or not at all, an enum without
  the right option, a hint the question type does not take).
- `draw_question(scene, rng, ...)` draws a question with one right answer: type, phrasing,
  thing and hint at random unless given.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from daemon.commands.demo import scenes
from npu.engine.formats import BOOLEAN_HINT, NUMBER_HINT, format_hint

__all__ = ["BOOLEAN_HINT", "FORMS", "HINTS", "NUMBER_HINT", "OUT_OF_WORLD_REPLY", "THINGS", "Asked", "answer",
           "draw_caption", "draw_question", "format_hint", "parse", "question_types", "variant", "with_hint"]

OUT_OF_WORLD_REPLY = "I only know shapes and colours."
# The formats each hint kind stands for (what a client sends as `format`).
HINT_FORMATS = {"boolean": {"type": "boolean"}, "number": {"type": "integer", "minimum": 0, "maximum": 3}}


FORMS: dict[str, tuple[str, ...]] = {
    "how many": (
        "How many shapes are there?",
        "How many shapes do you see?",
        "Count the shapes.",
        "How many shapes are in the image?",
        "How many shapes can you see?",
        "What is the number of shapes?",
    ),
    "is there": (
        "Is there a {thing}?",
        "Do you see a {thing}?",
        "Can you see a {thing}?",
        "Is there a {thing} in the image?",
        "Does the image show a {thing}?",
    ),
    "what colour": (
        "What colour is the {kind}?",
        "Which colour is the {kind}?",
        "What colour does the {kind} have?",
        "What is the colour of the {kind}?",
    ),
    "where is": (
        "Where is the {kind}?",
        "Where is the {kind} located?",
        "Where is the {kind} in the image?",
        "Where do you see the {kind}?",
    ),
}
# How a presence question names what it looks for. Only the kind: at this size and training
# budget, presence with a colour ("is there a red star?", "a red shape") stayed at 63-84 %
# per phrasing (tools/eval_demo_model.py, 200 scenes) while everything else was above 93 %,
# so the demo is not trained on it. `parse` and `answer` still read such questions.
THINGS = ("{kind}",)
# Which hints each question type takes (what a `format` of that kind turns into).
HINTS = {"how many": ("number", "enum"), "is there": ("boolean", "enum"),
         "what colour": ("enum",), "where is": ("enum",)}
ENUM_VALUES = {"how many": scenes.NUMBERS[1:], "is there": ("yes", "no"),
               "what colour": tuple(scenes.COLOURS), "where is": tuple(scenes.PHRASES.values())}
_HINT_RE = re.compile(r"^(?P<base>.*?) (?:(?P<boolean>Answer yes or no\.)|(?P<number>Answer with a number\.)|"
                      r"Answer with one of: (?P<options>.+)\.)$", re.DOTALL)


@dataclass(frozen=True)
class Asked:
    text: str  # the prompt as sent (hint included)
    answer: str
    type: str  # "caption", one of scenes.QUESTION_TYPES, or "out of world"
    form: str  # the phrasing: a CAPTION_PROMPTS entry or a FORMS template ("{thing}" filled as THINGS)
    hint: str  # "plain", "boolean", "number" or "enum"


def variant(text: str, rng: random.Random, lower: float = 0.3, color: float = 0.4, bare: float = 0.15) -> str:
    """A spelling a user may type: lower-case first letter, US "color", no final punctuation."""
    if rng.random() < lower:
        text = text[0].lower() + text[1:]
    if "colour" in text and rng.random() < color:
        text = text.replace("colour", "color")
    if text[-1] in "?." and rng.random() < bare:
        text = text[:-1]
    return text


def with_hint(question: str, hint: str, options=()) -> str:
    """The question as vlmd sends it for a format of this kind ("enum": of `options`)."""
    if hint == "plain":
        return question
    return question + " " + format_hint(HINT_FORMATS.get(hint) or {"enum": list(options)})


def _normal(text: str) -> str:
    text = text.strip()
    text = text[:1].lower() + text[1:]
    text = re.sub(r"\bcolor\b", "colour", text)
    return text[:-1] if text[-1:] in ("?", ".") else text


def _pattern(form: str) -> re.Pattern:
    kinds, colours = "|".join(scenes.KINDS), "|".join(scenes.COLOURS)
    body = re.escape(_normal(form))
    body = body.replace(re.escape("{thing}"), rf"(?:(?P<colour>{colours}) )?(?P<kind>{kinds}|shape)")
    body = body.replace(re.escape("{kind}"), rf"(?P<kind>{kinds})")
    return re.compile(body + "$")


_CAPTIONS = {_normal(prompt): prompt for prompt in scenes.CAPTION_PROMPTS}
_PATTERNS = [(kind, form, _pattern(form)) for kind, forms in FORMS.items() for form in forms]


def parse(prompt: str):
    """(type, form, hint, options, colour, kind) of a prompt; type "out of world" when it
    is none of the demo's. `form` has "{thing}" filled as one of THINGS."""
    match = _HINT_RE.match(prompt.strip())
    hint, options, base = "plain", (), prompt
    if match:
        base = match["base"]
        hint = "boolean" if match["boolean"] else "number" if match["number"] else "enum"
        options = tuple(match["options"].split(", ")) if hint == "enum" else ()
    text = _normal(base)
    if text in _CAPTIONS:
        return "caption", _CAPTIONS[text], hint, options, None, None
    for kind, form, pattern in _PATTERNS:
        found = pattern.match(text)
        if found:
            groups = found.groupdict()
            colour, shape = groups.get("colour"), groups.get("kind")
            if "{thing}" in form:
                if shape == "shape" and colour is None:
                    continue  # "is there a shape?" names no kind or colour
                thing = "{colour} shape" if shape == "shape" else "{colour} {kind}" if colour else "{kind}"
                form = form.replace("{thing}", thing)
            return kind, form, hint, options, colour, shape
    return "out of world", "", hint, options, None, None


def answer(scene: scenes.Scene | None, prompt: str) -> str | None:
    """The one right answer to `prompt` about `scene` (None: asked without an image or
    about several, when every prompt gets OUT_OF_WORLD_REPLY), None when there is none."""
    kind, _, hint, options, colour, shape = parse(prompt)
    if kind == "out of world" or scene is None:
        return OUT_OF_WORLD_REPLY
    if hint not in ("plain", *HINTS.get(kind, ())):
        return None
    if kind == "caption":
        return scene.caption()
    if kind == "how many":
        count = len(scene.shapes)
        right = str(count) if hint == "number" else scenes.NUMBERS[count]
    elif kind == "is there":
        right = "yes" if any((colour in (None, s.colour)) and (shape in ("shape", s.kind))
                             for s in scene.shapes) else "no"
    else:
        same = [s for s in scene.shapes if s.kind == shape]
        if len(same) != 1:
            return None
        right = same[0].colour if kind == "what colour" else scenes.PHRASES[same[0].position]
    if hint == "enum" and right not in options:
        return None
    return right


def question_types(scene: scenes.Scene) -> list[str]:
    """The QUESTION_TYPES this scene can be asked (colour and place need a kind shown once)."""
    kinds = [s.kind for s in scene.shapes]
    unique = any(kinds.count(k) == 1 for k in kinds)
    return [t for t in scenes.QUESTION_TYPES if unique or t in ("how many", "is there")]


def _thing(scene: scenes.Scene, thing: str, rng: random.Random) -> tuple[str, str]:
    """(colour, kind) for a presence question, about half of them present."""
    colours = list(scenes.COLOURS)
    shape = rng.choice(scene.shapes)
    if thing == "{kind}":
        return "", rng.choice(scenes.KINDS)
    if thing == "{colour} shape":
        return (shape.colour if rng.random() < 0.5 else rng.choice(colours)), "shape"
    pick = rng.random()
    if pick < 0.5:
        return shape.colour, shape.kind
    if pick < 0.7:  # the kind is there, in another colour (maybe)
        return rng.choice(colours), shape.kind
    if pick < 0.9:  # the colour is there, on another kind (maybe)
        return shape.colour, rng.choice(scenes.KINDS)
    return rng.choice(colours), rng.choice(scenes.KINDS)


def draw_question(scene: scenes.Scene, rng: random.Random, kind: str | None = None, form: str | None = None,
                  hint: str | None = None, typed: float = 0.3, spell: bool = True) -> Asked:
    """A question about `scene` with one right answer. `kind` (a QUESTION_TYPES entry the
    scene can be asked), `form` (a FORMS entry of it) and `hint` ("plain" or one of
    HINTS[kind]) are drawn when None; `typed` is the share of hinted questions then.
    `spell` draws a `variant` spelling of the question."""
    kind = kind or rng.choice(question_types(scene))
    form = form or rng.choice(FORMS[kind])
    if hint is None:
        hint = rng.choice(HINTS[kind]) if rng.random() < typed else "plain"
    if kind in ("what colour", "where is"):
        unique = [s.kind for s in scene.shapes if [t.kind for t in scene.shapes].count(s.kind) == 1]
        filled = form.format(kind=rng.choice(unique))
    elif kind == "is there":
        thing = rng.choice(THINGS) if "{thing}" in form else ""
        colour, shape = _thing(scene, thing, rng)
        form = form.replace("{thing}", thing)
        filled = form.format(kind=shape, colour=colour)
    else:
        filled = form
    question = variant(filled, rng) if spell else filled
    right = answer(scene, question)
    options = ()
    if hint == "enum":
        values = list(ENUM_VALUES[kind])
        others = [v for v in values if v != right]
        options = [right, *rng.sample(others, rng.randint(1, len(others)))]
        rng.shuffle(options)
    text = with_hint(question, hint, options)
    return Asked(text, answer(scene, text), kind, form, hint)


def draw_caption(scene: scenes.Scene, rng: random.Random, prompt: str | None = None, spell: bool = True) -> Asked:
    prompt = prompt or rng.choice(scenes.CAPTION_PROMPTS)
    text = variant(prompt, rng, color=0.0) if spell else prompt
    return Asked(text, scene.caption(), "caption", prompt, "plain")
