"""daemon/commands/demo/questions.py (the demo's questions and their right answers) and the
out-of-world prompts of tools/out_of_world.py: the oracle the demo model is trained and
measured against must itself be right."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from daemon.commands.demo import questions as sq
from daemon.commands.demo import scenes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import out_of_world  # noqa: E402

SCENE = scenes.Scene(
    shapes=(
        scenes.Shape("circle", "red", "left", 0.1),
        scenes.Shape("star", "yellow", "centre", 0.1),
        scenes.Shape("circle", "blue", "right", 0.1),
    ),
    background="plain",
)


@pytest.mark.parametrize("prompt, want", [
    ("Describe the image in one sentence.", SCENE.caption()),
    ("what do you see", SCENE.caption()),
    ("What is in the picture?", SCENE.caption()),
    ("How many shapes are there?", "three"),
    ("Count the shapes", "three"),
    ("How many shapes do you see? Answer with a number.", "3"),
    ("How many shapes are there? Answer with one of: two, three.", "three"),
    ("Is there a circle?", "yes"),
    ("is there a square", "no"),
    ("Is there a red circle?", "yes"),
    ("Is there a yellow circle?", "no"),
    ("Do you see a blue shape?", "yes"),
    ("Can you see a green shape?", "no"),
    ("Is there a star? Answer yes or no.", "yes"),
    ("Is there a triangle? Answer with one of: no, yes.", "no"),
    ("What colour is the star?", "yellow"),
    ("what color is the star", "yellow"),
    ("Which colour is the star?", "yellow"),
    ("What colour is the star? Answer with one of: red, green, blue, yellow, white.", "yellow"),
    ("Where is the star?", "in the centre"),
    ("Where is the star located?", "in the centre"),
    ("Where is the star? Answer with one of: on the right, in the centre.", "in the centre"),
    ("Who is at the door?", sq.OUT_OF_WORLD_REPLY),
    ("Say hello.", sq.OUT_OF_WORLD_REPLY),
    ("What changed?", sq.OUT_OF_WORLD_REPLY),
    ("What is the weather like?", sq.OUT_OF_WORLD_REPLY),
    ("Is there a parcel? Answer yes or no.", sq.OUT_OF_WORLD_REPLY),
    ("Is there a purple circle?", sq.OUT_OF_WORLD_REPLY),
    ("Is there a shape?", sq.OUT_OF_WORLD_REPLY),
    ("Describe the dog.", sq.OUT_OF_WORLD_REPLY),
])
def test_answers_follow_the_scene(prompt, want):
    assert sq.answer(SCENE, prompt) == want


@pytest.mark.parametrize("prompt", [
    "What colour is the circle?",  # two circles: no single right answer
    "Where is the square?",  # none at all
    "What colour is the star? Answer with one of: red, blue.",  # the right option is missing
    "What colour is the star? Answer yes or no.",  # a hint its type does not take
    "Describe the image. Answer with a number.",
])
def test_questions_without_one_right_answer_have_none(prompt):
    assert sq.answer(SCENE, prompt) is None


def test_without_an_image_every_prompt_gets_the_reply():
    assert sq.answer(None, "Describe the image.") == sq.answer(None, "Say hello.") == sq.OUT_OF_WORLD_REPLY


def test_hinted_questions_are_what_vlmd_asks_for_a_format():
    from npu.engine.formats import with_hint

    question = "Is there a star?"
    assert sq.with_hint(question, "boolean") == with_hint(question, {"type": "boolean"})
    assert sq.with_hint(question, "number") == with_hint(question, {"type": "number"})
    assert sq.with_hint(question, "enum", ["no", "yes"]) == with_hint(question, {"enum": ["no", "yes"]})
    assert sq.with_hint(question, "plain") == question


def test_drawn_questions_have_one_right_answer_and_cover_every_phrasing():
    rng = random.Random(3)
    seen_forms, seen_hints, present = set(), set(), {"yes": 0, "no": 0}
    for seed in range(300):
        scene = scenes.random_scene(seed)
        asked = sq.draw_question(scene, rng, typed=0.5)
        assert asked.answer is not None and sq.answer(scene, asked.text) == asked.answer
        assert sq.parse(asked.text)[0] == asked.type
        seen_forms.add(asked.form)
        seen_hints.add((asked.type, asked.hint))
        if asked.type == "is there" and asked.hint == "plain":
            present[asked.answer] += 1
        if asked.hint == "enum":  # the options hold the answer, in varying order and number
            options = sq.parse(asked.text)[3]
            assert asked.answer in options and len(set(options)) == len(options) >= 2
    kinds_of_forms = sum(len(forms) for kind, forms in sq.FORMS.items() if kind != "is there")
    assert len(seen_forms) == kinds_of_forms + len(sq.FORMS["is there"]) * len(sq.THINGS)
    assert seen_hints == {(kind, hint) for kind in sq.HINTS for hint in ("plain", *sq.HINTS[kind])}
    assert min(present.values()) > 0.3 * sum(present.values())  # presence questions are not mostly "no"


def test_at_least_ten_caption_phrasings_starting_with_the_default_prompt():
    from daemon.config import CameraConfig
    from daemon.scheduler import CaptionPolicy

    assert len(scenes.CAPTION_PROMPTS) >= 10
    assert scenes.CAPTION_PROMPTS[0] == CameraConfig.model_fields["prompt"].default == CaptionPolicy.prompt
    rng = random.Random(0)
    spelled = {sq.variant(p, rng, lower=0.5, bare=0.5) for p in scenes.CAPTION_PROMPTS for _ in range(20)}
    assert all(sq.parse(text)[0] == "caption" for text in spelled)
    assert any(text[0].islower() for text in spelled) and any(text[-1] not in "?." for text in spelled)


def test_out_of_world_prompts_are_out_of_world_and_held_out_ones_are_new():
    rng = random.Random(1)
    train = {out_of_world.out_of_world_prompt(rng, "train") for _ in range(50_000)}
    held_out = [out_of_world.out_of_world_prompt(rng, "held-out") for _ in range(2000)]
    assert all(sq.answer(SCENE, text) == sq.OUT_OF_WORLD_REPLY for text in [*train, *held_out])
    assert not train & set(held_out)
    assert len(set(held_out)) > 1000 and len(train) > 10_000  # varied, not a short list
    assert {"Who is at the door?", "Say hello.", "What changed?", "What is the weather like?"} <= train
