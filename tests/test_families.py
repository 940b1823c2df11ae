"""The model-family seam (npu/families/): the engine runs whatever positions and added planes
a family gives, keeps a token's rotary position apart from its KV row, and stays family-free.

The fake family here compresses each image's rows to one rotary position (as M-RoPE does in
part) and adds a plane after layer 0 at the image rows: the engine must feed exactly those
positions in every prefill path and decode step, write every row at its own KV row, and the
answer must depend on the added plane.
"""

from __future__ import annotations

import numpy as np
import pytest

from npu.engine import Engine, Prompt
from npu.families import DEFAULT_FAMILY, FAMILIES, family_named, family_of
from npu.families.internvl import InternVLFamily
from npu.shapes import ShapeError, read_shapes
from tests.test_engine import F32, LONG_QUESTION, image, make_model, run, tokenizer_and_template  # noqa: F401


class SquashedFamily(InternVLFamily):
    """Every image's rows share one rotary position; a plane of 0.25 x features after layer 0."""

    name = "squashed"

    def __init__(self, add_scale: float = 0.25) -> None:
        self.add_scale = add_scale

    def image_planes(self, outputs, shapes):
        features = super().image_planes(outputs, shapes)[0]
        return [features, features * self.add_scale]

    def added_layers(self, shapes):
        return (0,)

    def positions(self, ids, image_token_id, shapes):
        image_rows = np.flatnonzero(np.asarray(ids) == image_token_id)
        squashed = np.zeros(len(ids), bool)
        for start in image_rows[::shapes.image_tokens]:
            squashed[start + 1:start + shapes.image_tokens] = True  # later rows of an image: no step
        positions = np.cumsum(~squashed) - 1
        return positions.astype(np.uint32)[None, :], int(positions[-1]) + 1


def recording(model):
    """Record (group, indices, cache position) of every layer-0 call."""
    layer, seen = model.layers[0], []
    original = layer.run

    def run_and_record(feed, group=0):
        seen.append((group, feed["indices"].copy()))
        return original(feed, group)

    layer.run = run_and_record
    return seen


def test_family_registry_and_default():
    assert family_named(None) is DEFAULT_FAMILY is FAMILIES["internvl"]
    assert family_of(object()) is DEFAULT_FAMILY
    with pytest.raises(ValueError, match="unknown model family"):
        family_named("nope")


@pytest.mark.parametrize("chunk,history", [(16, (16, 32, 48, 64, 80)), (16, ()), (0, ())])
def test_decode_after_an_image_uses_the_family_position_and_the_next_kv_row(make_model, chunk, history):
    model = make_model(chunk=chunk, history=history)
    model.family = SquashedFamily()
    seen = recording(model)
    engine = Engine(model)
    prompt = Prompt(LONG_QUESTION, images=[image()])
    n = engine.count_prompt_tokens(prompt)
    positions, after = model.family.positions(engine._encode(prompt).ids, model.template.image_context_id,
                                              engine.shapes)
    assert after == n - (engine.shapes.image_tokens - 1)  # the two differ after the image
    tokens, done = run(engine, prompt, max_tokens=6, ignore_stop=True)
    assert engine.cache.position == n + 5  # every row at its own KV row: prompt, then 5 decoded tokens
    # the prompt rows were fed exactly the family's positions (chunk padding after them)
    rows_fed, decode_fed = [], []
    row = 0
    for group, indices in seen:
        if row < n:
            size = min(indices.shape[1], n - row) if group else 1
            rows_fed.extend(indices[0, :size])
            row += size
        else:
            decode_fed.append(int(indices[0, 0]))
    np.testing.assert_array_equal(rows_fed, positions[0])
    assert decode_fed == [after + t for t in range(5)]
    # no decode step wrote into a prompt row: they equal a prefill-only run's
    only_prefill = make_model(chunk=chunk, history=history)
    only_prefill.family = SquashedFamily()
    prefilled = Engine(only_prefill)
    run(prefilled, prompt, max_tokens=1, ignore_stop=True)
    np.testing.assert_array_equal(engine.cache.keys[:, :, :n], prefilled.cache.keys[:, :, :n])


def test_every_prefill_path_agrees_with_added_planes_and_they_matter(make_model):
    prompt = Prompt(LONG_QUESTION, images=[image()])
    answers = {}
    for name, chunk, history, scale in (("history", 16, (16, 32, 48, 64, 80), 0.25), ("classic", 16, (), 0.25),
                                        ("decode-only", 0, (), 0.25), ("no-plane", 16, (16, 32, 48, 64, 80), 0.0)):
        model = make_model(chunk=chunk, history=history, dtype=F32)
        model.family = SquashedFamily(scale)
        answers[name] = run(Engine(model), prompt, max_tokens=8, ignore_stop=True)[0]
        if name == "no-plane":
            post = np.stack(model.post.seen)
    assert answers["history"] == answers["classic"] == answers["decode-only"]
    model = make_model(chunk=16, history=(16, 32, 48, 64, 80), dtype=F32)
    model.family = SquashedFamily(0.25)
    run(Engine(model), prompt, max_tokens=8, ignore_stop=True)
    assert not np.allclose(np.stack(model.post.seen), post)  # the added plane reached the logits


def test_follow_ups_and_conversations_resume_at_the_family_position(make_model):
    model = make_model(chunk=16, history=(16, 32, 48, 64, 80))
    model.family = SquashedFamily()
    engine = Engine(model)
    first = Prompt("What is this?", images=[image()], image_key="k")
    follow = Prompt("And the colour? " * 3, images=[image()], image_key="k")
    run(engine, first, max_tokens=3, ignore_stop=True)
    reused = run(engine, follow, max_tokens=5, ignore_stop=True)
    fresh_model = make_model(chunk=16, history=(16, 32, 48, 64, 80))
    fresh_model.family = SquashedFamily()
    fresh = run(Engine(fresh_model), follow, max_tokens=5, ignore_stop=True)
    assert reused[1].timings["prefix_reused"] and reused[0] == fresh[0]
    # a conversation's second turn from its cached rows equals the same turn prefilled again from its ids
    # (its first turn's image rows included: positions come from the whole conversation's ids)
    answers = []
    for lost in (False, True):
        talk = make_model(chunk=16, history=(16, 32, 48, 64, 80))
        talk.family = SquashedFamily()
        engine = Engine(talk)
        run(engine, Prompt("What is this?", images=[image()], conversation="c"), max_tokens=4, ignore_stop=True)
        if lost:  # the parked rows are gone: the turn is prefilled from the ids and the stored image planes
            engine.conversations.park(engine.cache)
            conversation = engine.conversations.get("c")
            conversation.snapshot, conversation.valid_rows = None, 0
            engine.cache.reset()
        tokens, done = run(engine, Prompt("Why?", conversation="c"), max_tokens=4, ignore_stop=True)
        assert (done.timings["history_rows"] == 0) == lost
        answers.append(tokens)
    assert answers[0] == answers[1]


def test_index_rows_must_match_the_family(make_model):
    model = make_model(chunk=16, history=(16,))

    class ThreeRows(InternVLFamily):
        name, index_rows = "three", 3

    model.family = ThreeRows()
    with pytest.raises(ShapeError, match="1 rows of indices, the three family writes 3"):
        read_shapes(model)
