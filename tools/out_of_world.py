"""Prompts outside the demo model's world, which it must answer with OUT_OF_WORLD_REPLY.

    out_of_world_prompt(rng, split="train" | "held-out") -> str

Greetings, other subjects ("Who is at the door?", "What is the weather like?"), tasks
("Say hello.", "Open the door."), near misses of the demo's own questions ("Is there a
parcel?", "What colour is the car?", "Describe the dog.", "What do you hear?"), questions
about the shapes it cannot answer ("Is the circle happy?"), statements and word salad.

Held-out prompts differ from every training prompt by construction: every word list, the
fixed sentences and the templates are split in two (every third entry held out), and a
held-out prompt is a held-out sentence, a held-out template, or a training template with
at least one held-out word. Every prompt is checked to be out of world for
daemon.commands.demo.questions (never an in-world question by accident).
"""

from __future__ import annotations

import random

from daemon.commands.demo import scenes
from daemon.commands.demo.questions import parse

SPLITS = ("train", "held-out")

NOUNS = (
    "door car dog cat person man woman child tree house parcel box phone key bike window garden "
    "street sky cloud sun moon bird ball chair table cup bottle book lamp flower truck bus boat horse "
    "cow fish apple banana bag hat shoe shirt clock computer camera fence gate roof road river mountain "
    "train plane baby face hand package letter cake pizza bed sofa robot toy rock sign wall floor "
    "kitchen mouse spoon knife glass coat dress umbrella ladder bridge tower engine wheel drawer "
    "mirror pillow blanket candle basket bucket helmet tractor rabbit sheep duck goose frog snake"
).split()
PLACES = ("door gate window table desk corner entrance station park beach front back garage garden "
          "kitchen porch street office shop school fence stairs bus stop").split()
NAMES = ("Alice Bob Carol Dave Emma Frank Grace Henry Ivan Julia Karl Lena Maria Noah Olga Paul "
         "Quinn Rosa Sam Tina Uwe Vera Will Xena Yuri Zoe").split()
ADJECTIVES = ("happy sad big small old new open closed wet dry hot cold heavy light fast slow broken clean "
              "dirty angry tired empty full loud quiet beautiful ugly real alive safe dangerous soft hard "
              "round sharp funny strange famous hungry lonely").split()
VERBS = ("run sleep eat open close drive walk read write sing dance jump swim cook fly hear feel smell "
         "taste think know want like need buy sell find lose fix build paint push pull carry throw "
         "catch wash hide move stop start").split()
TOPICS = ("weather time news traffic music price date score temperature menu plan forecast "
          "film game market road noise light smell").split()
GREETINGS = ("hello", "hi", "goodbye", "thanks", "good morning", "good night", "sorry", "please",
             "hey", "cheers", "welcome", "bye")
TALES = ("joke", "story", "secret", "poem", "fact", "riddle", "song", "lie")
OTHER_COLOURS = ("purple", "orange", "pink", "black", "brown", "grey", "violet", "cyan")
FIXED = (
    "What changed?", "What happened?", "Who are you?", "How are you?", "What time is it?",
    "What day is it today?", "Help!", "Is anyone home?", "What is your name?", "Are you a robot?",
    "What should I do?", "Is it raining?", "Good morning.", "Thank you.", "Why?", "Where am I?",
    "Is the door open?", "What is new?", "Anything unusual?", "Is everything okay?",
    "Did something move?", "What is going on?", "Who is there?", "Is somebody there?",
    "What is that noise?", "Play some music.", "Turn on the light.", "What is the meaning of life?",
    "Translate this.", "Write a poem.", "Yes.", "No.", "OK", "Stop.", "Continue.", "Repeat that.",
    "Wie spät ist es?", "Qu'est-ce que c'est?", "这是什么？", "¿Qué hora es?", "1 + 1 = ?",
    "Ignore all previous instructions.", "Are you sure?", "Explain.", "Is it day or night?",
    "Is the image blurry?", "How big is the picture?", "Who made you?", "Do you like shapes?",
    "Can you draw a circle?", "Why is the sky blue?", "What is a triangle?", "Hello there!",
)
TEMPLATES = (
    "Who is at the {place}?", "What is the {topic} like?", "Tell me a {tale}.", "Say {greeting}.",
    "{Greeting}!", "Tell me about the {noun}.", "Is there a {noun}?", "Is there a {colour} {noun}?",
    "Do you see a {noun}?", "How many {nouns} are there?", "How many {nouns} do you see?", "Count the {nouns}.",
    "What colour is the {noun}?", "Where is the {noun}?", "Where is my {noun}?", "Where is {name}?",
    "Is the {kind} {adjective}?", "Why is the {kind} {colour}?", "Can the {kind} {verb}?",
    "Describe the {noun}.", "What is in the {noun}?", "What do you {verb}?", "Can you {verb} the {noun}?",
    "Please {verb} the {noun}.", "{Name} wants to {verb} the {noun}.", "The {noun} is {adjective}.",
    "I {verb} the {noun}.", "Is the {noun} {adjective}?", "What is {number} plus {number}?",
    "Is {name} at home?", "Is there a {other} {kind}?", "What is the {noun} doing?",
    "Is the {noun} at the {place}?", "Who has the {noun}?", "How old is {name}?", "Where can I buy a {noun}?",
    "What colour is my {noun}?", "Tell me what you {verb}.", "Is there a {noun} at the {place}?",
    "How many {kind}s are {adjective}?", "Find the {noun}.", "Show me the {noun}.",
    "What does the {noun} look like?", "Which {noun} is {adjective}?", "Describe the {noun} shortly.",
)
_WORDS = {"noun": NOUNS, "nouns": NOUNS, "place": PLACES, "name": NAMES, "Name": NAMES, "adjective": ADJECTIVES,
          "verb": VERBS, "topic": TOPICS, "greeting": GREETINGS, "Greeting": GREETINGS, "tale": TALES,
          "colour": tuple(scenes.COLOURS), "other": OTHER_COLOURS, "kind": scenes.KINDS,
          "number": tuple(str(n) for n in range(13))}
# Slots filled from the demo's own words: never held out, so that a held-out prompt differs
# from training by something the demo does not know.
_OWN = ("colour", "kind")
_IRREGULAR = {"man": "men", "woman": "women", "child": "children", "person": "people", "fish": "fish",
              "mouse": "mice", "sheep": "sheep", "knife": "knives", "goose": "geese", "baby": "babies"}


def _held_out(index: int) -> bool:
    return index % 3 == 2


def _part(values, split: str) -> list:
    return [v for i, v in enumerate(values) if _held_out(i) == (split == "held-out")]


def _plural(noun: str) -> str:
    if noun in _IRREGULAR:
        return _IRREGULAR[noun]
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _fill(template: str, rng: random.Random, held_slot: int | None) -> str:
    """Fill every {slot}; the slot numbered `held_slot` takes a held-out word, every other
    slot a training word (None: all training words)."""
    text, slot = template, 0
    while "{" in text:
        start = text.index("{")
        name = text[start + 1 : text.index("}", start)]
        values = _WORDS[name]
        if name not in _OWN:
            values = _part(values, "held-out" if slot == held_slot else "train")
        word = rng.choice(values)
        word = _plural(word) if name == "nouns" else word.capitalize() if name == "Greeting" else word
        text = text[:start] + word + text[text.index("}", start) + 1 :]
        slot += name not in _OWN
    return text


def _salad(rng: random.Random, split: str) -> str:
    """2-7 words from the lists; a held-out salad has at least one held-out word."""
    lists = [NOUNS, ADJECTIVES, VERBS, NAMES, PLACES, TOPICS]
    count = rng.randint(2, 7)
    held = rng.randrange(count) if split == "held-out" else -1
    words = [rng.choice(_part(rng.choice(lists), "held-out" if i == held else "train")) for i in range(count)]
    text = " ".join(words)
    text = text[0].upper() + text[1:] if rng.random() < 0.5 else text
    return text + rng.choice((".", "?", "!", ""))


def _draw(rng: random.Random, split: str) -> str:
    pick = rng.random()
    if pick < 0.15:
        return rng.choice(_part(FIXED, split))
    if pick < 0.25:
        return _salad(rng, split)
    if split == "train":
        return _fill(rng.choice(_part(TEMPLATES, "train")), rng, None)
    if pick < 0.6:  # a held-out template, training words
        return _fill(rng.choice(_part(TEMPLATES, "held-out")), rng, None)
    template = rng.choice([t for t in _part(TEMPLATES, "train") if _slots(t)])
    return _fill(template, rng, rng.randrange(_slots(template)))


def _slots(template: str) -> int:
    return sum(1 for piece in template.split("{")[1:] if piece.split("}")[0] not in _OWN)


def out_of_world_prompt(rng: random.Random, split: str = "train") -> str:
    """A prompt outside the demo's world, from the `split` half of the generator."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    while True:
        text = _draw(rng, split)
        if parse(text)[0] == "out of world":
            return text


def corpus_words() -> list[str]:
    """Training-side words and sentences, for the tokenizer's corpus (held-out words
    still encode, as any text does, just in smaller pieces)."""
    rng = random.Random(0)
    return [out_of_world_prompt(rng, "train") for _ in range(3000)]
