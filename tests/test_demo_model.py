"""The demo model and its scenes: grammar, checkpoint format, and captions that mean something.

The semantic tests run the shipped checkpoint through vlmd's own runtime (reference
backend, bf16, the board's dtypes) on scenes the training never drew, so a wrong colour
order, resize, image splice position or template shows up as a wrong caption.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.commands.demo import questions as scene_questions, scenes

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "npu" / "assets" / "demo_model"
HELD_OUT_SEED = 9_000_000  # as tools/eval_demo_model.py; training never draws these seeds
CAPTION_PROMPT = scenes.CAPTION_PROMPTS[0]  # vlmd's default caption prompt
sys.path.insert(0, str(REPO / "tools"))
import eval_demo_model as accuracy_script  # noqa: E402
from out_of_world import out_of_world_prompt  # noqa: E402


# ---- scenes ------------------------------------------------------------------------------

def test_same_seed_draws_the_same_scene():
    image_a, scene_a = scenes.draw_scene(7)
    image_b, scene_b = scenes.draw_scene(7)
    assert scene_a == scene_b
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
    assert image_a.mode == "RGB" and image_a.size == scenes.DEFAULT_SIZE


def test_caption_lists_shapes_in_reading_order():
    scene = scenes.Scene(
        shapes=(
            scenes.Shape("circle", "red", "left", 0.1),
            scenes.Shape("star", "yellow", "centre", 0.1),
            scenes.Shape("square", "blue", "right", 0.1),
        ),
        background="plain",
    )
    assert scene.caption() == (
        "a red circle on the left and a yellow star in the centre and a blue square on the right"
    )
    answers = dict(scene.questions())
    assert answers["how many shapes are there?"] == "three"
    assert answers["is there a triangle?"] == "no"
    assert answers["what colour is the square?"] == "blue"
    assert answers["where is the star?"] == "in the centre"
    grouped = scene.questions_by_type()
    assert list(grouped) == list(scenes.QUESTION_TYPES)
    assert grouped["is there"][2] == ("is there a triangle?", "no") and len(grouped["where is"]) == 3
    assert scenes.without_kinds(scene.caption()).startswith("a red shape on the left and a yellow shape")


def test_colour_question_only_for_a_unique_kind():
    scene = scenes.Scene(
        shapes=(scenes.Shape("circle", "red", "left", 0.1), scenes.Shape("circle", "blue", "right", 0.1)),
        background="noisy",
    )
    questions = [q for q, _ in scene.questions()]
    assert "what colour is the circle?" not in questions
    assert dict(scene.questions())["is there a circle?"] == "yes"


def test_shapes_are_drawn_where_the_caption_says():
    scene = scenes.Scene(shapes=(scenes.Shape("square", "red", "left", 0.12),), background="plain")
    rgb = np.asarray(scenes.render(scene, 0, size=(320, 240))).astype(int)  # (240, 320, 3)
    red = (rgb[:, :, 0] > 150) & (rgb[:, :, 2] < 100)
    ys, xs = np.nonzero(red)
    assert xs.mean() < 320 * 0.3 and abs(ys.mean() - 120) < 20


# ---- checkpoint format -------------------------------------------------------------------

def _require_checkpoint() -> None:
    if not (DEMO_DIR / "model.safetensors").is_file():
        pytest.skip(f"demo model not built yet at {DEMO_DIR} (python tools/train_demo_model.py)")


def test_checkpoint_is_a_small_hf_internvl_dir():
    _require_checkpoint()
    from safetensors import safe_open
    from tokenizers import Tokenizer

    config = json.loads((DEMO_DIR / "config.json").read_text())
    tok = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    assert config["template"] == "Hermes-2"
    assert config["image_token_id"] == tok.token_to_id("<IMG_CONTEXT>")
    assert config["text_config"]["vocab_size"] == tok.get_vocab_size(with_added_tokens=True)
    total = sum(f.stat().st_size for f in DEMO_DIR.iterdir())
    assert total <= 10 * 1024 * 1024
    with safe_open(str(DEMO_DIR / "model.safetensors"), "np") as weights:
        names = list(weights.keys())
        dtypes = {weights.get_slice(name).get_dtype() for name in names}
    # transformers-native InternVL names as the "-hf" checkpoints store them; tied head.
    assert "language_model.model.embed_tokens.weight" in names
    assert "vision_tower.embeddings.cls_token" in names
    assert "multi_modal_projector.linear_1.weight" in names
    assert "lm_head.weight" not in names and config["tie_word_embeddings"]
    assert dtypes == {"BF16"}
    assert (DEMO_DIR / "README.md").is_file()


# ---- semantics through vlmd's runtime ----------------------------------------------------

@pytest.fixture(scope="module")
def ask():
    """ask(rgb, question) -> greedy answer text through npu's engine on the demo model."""
    _require_checkpoint()
    try:
        from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt
        from npu.model import load_model

        engine = Engine(load_model(str(DEMO_DIR), backend="reference", precision="bf16"))
    except ImportError as exc:
        pytest.skip(f"npu runtime cannot load the demo model yet: {exc}")
    options = GenerationOptions(max_tokens=40)

    def run(rgb: np.ndarray | None, question: str) -> str:
        images = [rgb] if rgb is not None else []
        events = list(engine.generate(Prompt(text=question, images=images), options))
        assert isinstance(events[-1], DoneEvent) and events[-1].finish_reason == "stop"
        return events[-1].text

    return run



def colours_in(caption: str) -> list[str]:
    return [word for word in caption.split(" ") if word in scenes.COLOURS]


def test_fresh_scenes_get_exact_captions(ask):
    """Colour order, resize, splice position and template all show here: every colour,
    place and shape kind must be right (the model gets 98.5 % of held-out captions exact)."""
    results = []
    for seed in range(HELD_OUT_SEED, HELD_OUT_SEED + 8):
        image, scene = scenes.draw_scene(seed)
        results.append((ask(np.asarray(image), CAPTION_PROMPT), scene.caption()))
    assert sum(got == want for got, want in results) >= 7, results
    assert all(scenes.without_kinds(got) == scenes.without_kinds(want) for got, want in results), results


def test_fresh_scenes_get_questions_that_name_a_kind_right(ask):
    """"is there a star?", "what colour is the star?", "where is the star?": the question's
    kind word must find its shape (a model that guesses from the shape count fails)."""
    results = []
    for seed in range(HELD_OUT_SEED + 200, HELD_OUT_SEED + 206):
        image, scene = scenes.draw_scene(seed)
        rgb = np.asarray(image)
        for question, answer in scene.questions()[1:]:  # all but "how many"
            results.append((question, ask(rgb, question), answer))
    right = sum(got == want for _, got, want in results)
    assert right >= 0.9 * len(results), [r for r in results if r[1] != r[2]]


def test_fresh_scenes_get_the_count_right(ask):
    results = []
    for seed in range(HELD_OUT_SEED + 100, HELD_OUT_SEED + 108):
        image, scene = scenes.draw_scene(seed)
        results.append((ask(np.asarray(image), "how many shapes are there?"), scenes.NUMBERS[len(scene.shapes)]))
    assert sum(got == want for got, want in results) >= 7, results


def test_swapping_colour_channels_swaps_red_and_blue(ask):
    """A BGR bug turns red into blue: the caption must notice, so accuracy tests see it."""
    scene = scenes.Scene(
        shapes=(scenes.Shape("circle", "red", "left", 0.11), scenes.Shape("square", "blue", "right", 0.11)),
        background="plain",
    )
    rgb = np.asarray(scenes.render(scene, 3))  # (H, W, 3)
    assert colours_in(ask(rgb, CAPTION_PROMPT)) == ["red", "blue"]
    swapped = ask(np.ascontiguousarray(rgb[:, :, ::-1]), CAPTION_PROMPT)
    assert colours_in(swapped) == ["blue", "red"], swapped


def test_every_caption_phrasing_gets_the_caption(ask):
    """Each of scenes.CAPTION_PROMPTS, as written and in a varied spelling, on fresh scenes."""
    rng = random.Random(0)
    results = []
    for index, prompt in enumerate(scenes.CAPTION_PROMPTS):
        image, scene = scenes.draw_scene(HELD_OUT_SEED + 300 + index)
        rgb = np.asarray(image)
        for text in (prompt, scene_questions.variant(prompt, rng, lower=0.5, bare=0.5)):
            results.append((text, ask(rgb, text), scene.caption()))
    right = sum(got == want for _, got, want in results)
    assert right >= 0.9 * len(results), [r for r in results if r[1] != r[2]]
    assert all(scenes.without_kinds(got) == scenes.without_kinds(want) for _, got, want in results), results


def test_every_question_phrasing_gets_the_right_answer(ask):
    """Each phrasing of scene_questions.FORMS, subjects and spellings drawn, on fresh scenes."""
    rng = random.Random(1)
    results = []
    for seed in range(HELD_OUT_SEED + 400, HELD_OUT_SEED + 404):
        image, scene = scenes.draw_scene(seed)
        rgb = np.asarray(image)
        for kind in scene_questions.question_types(scene):
            for form in scene_questions.FORMS[kind]:
                asked = scene_questions.draw_question(scene, rng, kind=kind, form=form, hint="plain")
                results.append((asked.text, ask(rgb, asked.text), asked.answer))
    assert len(results) >= 60
    right = sum(got == want for _, got, want in results)
    assert right >= 0.9 * len(results), [r for r in results if r[1] != r[2]]


def test_typed_questions_get_typed_answers(ask):
    """As vlmd asks for a `format`: a yes/no, digits for a number, one of the enum's options."""
    rng = random.Random(2)
    results = []
    for seed in range(HELD_OUT_SEED + 500, HELD_OUT_SEED + 508):
        image, scene = scenes.draw_scene(seed)
        rgb = np.asarray(image)
        for kind in scene_questions.question_types(scene):
            for hint in scene_questions.HINTS[kind]:
                asked = scene_questions.draw_question(scene, rng, kind=kind, hint=hint)
                results.append((asked.text, ask(rgb, asked.text), asked.answer))
    count = "How many shapes are there?"
    image, scene = scenes.draw_scene(HELD_OUT_SEED + 508)
    assert ask(np.asarray(image), count + " " + scene_questions.NUMBER_HINT) == str(len(scene.shapes))
    assert ask(np.asarray(image), count) == scenes.NUMBERS[len(scene.shapes)]  # words without the hint
    right = sum(got == want for _, got, want in results)
    assert right >= 0.9 * len(results), [r for r in results if r[1] != r[2]]


def test_held_out_prompts_outside_its_world_get_the_fixed_reply(ask):
    """Prompts from the held-out half of tools/out_of_world.py (never trained), with an
    image and without."""
    rng = random.Random(3)
    results = []
    for seed in range(HELD_OUT_SEED + 600, HELD_OUT_SEED + 630):
        image, _ = scenes.draw_scene(seed)
        prompt = out_of_world_prompt(rng, "held-out")
        rgb = np.asarray(image) if seed % 3 else None
        results.append((prompt, ask(rgb, prompt)))
    right = sum(got == scene_questions.OUT_OF_WORLD_REPLY for _, got in results)
    assert right >= 0.95 * len(results), [r for r in results if r[1] != scene_questions.OUT_OF_WORLD_REPLY]


def test_later_conversation_turns_are_answered_about_the_first_turns_image():
    """Three-turn conversations (the image in turn one), each turn asked after the model's
    own earlier answers: turns two and three must be right as often as single questions."""
    _require_checkpoint()
    converse = accuracy_script.conversation_asker(DEMO_DIR, "bf16")
    rng = random.Random(4)
    results = []
    for seed in range(HELD_OUT_SEED + 700, HELD_OUT_SEED + 708):
        image, scene = scenes.draw_scene(seed)
        turns = accuracy_script.scene_turns(scene, rng)
        answers = converse(np.asarray(image), [t.text for t in turns], f"test:{seed}")
        results += [(t.text, got, t.answer) for t, got in zip(turns[1:], answers[1:])]
    right = sum(got == want for _, got, want in results)
    assert right >= 0.9 * len(results), [r for r in results if r[1] != r[2]]


def test_accuracy_script_measures_through_vlmd_ask():
    """tools/eval_demo_model.py's default backend runs the `vlmd ask` command (PNG file in,
    JSON final out); on a few scenes it must report what the engine answers directly."""
    _require_checkpoint()
    via_ask = accuracy_script.evaluate(accuracy_script.ask_asker(DEMO_DIR, "bf16"), 2, HELD_OUT_SEED, verbose=False)
    direct = accuracy_script.evaluate(accuracy_script.engine_asker(DEMO_DIR, "bf16"), 2, HELD_OUT_SEED,
                                      verbose=False)
    assert via_ask["tables"] == direct["tables"]
    assert via_ask["caption colours and places"] == 1.0  # the model means something on these scenes
