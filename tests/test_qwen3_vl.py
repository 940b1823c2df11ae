"""Qwen3-VL on the reference backend: greedy parity with transformers' Qwen3VLForConditionalGeneration
(an image, a follow-up on a stored prefix, a three-turn conversation), the graphs' contract
(names, shapes, groups, dtypes as the compiled packages have them), and the M-RoPE positions
kept apart from the KV rows after an image.

The oracle recomputes the whole sequence at each step with transformers' own get_rope_index and
its PIL image processor (tests/model_factory_qwen3vl.py); vlmd runs the engine's chunked prefill
(history groups), a decode step per token with the rotary position continuing from the prompt's
max position + 1 while the KV row continues from the rows written.
"""

from __future__ import annotations

import numpy as np
import pytest

from npu.engine import Engine, GenerationOptions, Prompt
from npu.families.qwen3_vl import QWEN3_VL, patchify
from npu.model import load_model
from npu.shapes import read_shapes
from tests.model_dims import random_image

N = 8  # answer tokens compared


def answer(engine, prompt, n=N):
    events = list(engine.generate(prompt, GenerationOptions(max_tokens=n, ignore_stop=True)))
    return [e.token_id for e in events[:-1]], events[-1]


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_vl):
    from tests import model_factory_qwen3vl as factory

    model = load_model(tiny_qwen3_vl.path, precision="fp32", kv_capacity=255, prefill_chunk=16, history_groups=6)
    return tiny_qwen3_vl, model, factory


def test_graphs_have_the_compiled_packages_names_shapes_groups_and_dtypes(qwen3):
    _, model, factory = qwen3
    s = read_shapes(model)
    assert model.family is QWEN3_VL and s.family == "qwen3_vl" and s.index_rows == 3
    vision = model.vision
    assert [(t.name, t.shape, t.dtype.name) for t in vision.inputs(0)] == [
        ("hidden_states", (1, 36, 2 * 16 * 16, 3), "uint8")]
    assert [t.name for t in vision.outputs(0)] == ["hidden_states_out", "deepstack_feature_0", "deepstack_feature_1",
                                                  "deepstack_feature_2"]
    assert {(t.shape, t.dtype.name) for t in vision.outputs(0)} == {((9, 64), "float32")}
    layer = model.layers[0]
    decode = {t.name: t for t in layer.inputs(0)}
    assert decode["indices"].shape == (1, 1) and decode["indices"].dtype == np.uint32
    for group in range(1, layer.num_groups):
        inputs = {t.name: t for t in layer.inputs(group)}
        assert inputs["indices"].shape == (3, 16) and inputs["indices"].dtype == np.uint32
    assert [t.name for t in layer.outputs(0)] == ["K_cache_out", "V_cache_out", "output"]
    assert s.image_tokens == factory.N_IMAGE_TOKENS and s.vision_planes == 4
    assert QWEN3_VL.added_layers(s) == (0, 1, 2)


def test_patch_order_and_normalisation_are_transformers(qwen3):
    """vlmd's uint8 patches, normalised as the graph does, are transformers' pixel_values."""
    _, model, factory = qwen3
    s = read_shapes(model)
    image = random_image(3, 120, 90)
    buffer = QWEN3_VL.prepare_image(model.preprocess, image, QWEN3_VL.input_buffer(s), s)
    expected, grid = factory.pixel_values([image])
    assert grid.tolist() == [[1, 6, 6]]
    ours = (buffer[0].astype(np.float32) / 255 - 0.5) / 0.5  # (36, 2*16*16, 3)
    ours = ours.reshape(36, 2, 16, 16, 3).transpose(0, 4, 1, 2, 3).reshape(36, -1)
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-6)


def test_positions_follow_get_rope_index(qwen3):
    """Text counts on; an image's rows take t = s, h = s + row, w = s + column; text after it
    resumes at s + max(grid_h, grid_w); transformers' own get_rope_index agrees."""
    import torch

    tiny, model, _ = qwen3
    s = read_shapes(model)
    image_id = model.template.image_context_id
    ids = [1, 2, 3] + [image_id] * 9 + [4, 5] + [image_id] * 9 + [6]
    positions, after = QWEN3_VL.positions(ids, image_id, s)
    assert positions[:, 3].tolist() == [3, 3, 3] and positions[:, 11].tolist() == [3, 5, 5]
    assert positions[:, 12].tolist() == [6, 6, 6] and after == positions.max() + 1
    tensor = torch.tensor([ids])
    expected, delta = tiny.torch_model.model.get_rope_index(
        tensor, (tensor == image_id).int(), image_grid_thw=torch.tensor([[1, 6, 6], [1, 6, 6]]))
    np.testing.assert_array_equal(positions, expected[:, 0].numpy())
    assert after == len(ids) + int(delta)


def test_greedy_answer_matches_transformers_and_depends_on_the_image(qwen3):
    tiny, model, factory = qwen3
    answers = []
    for seed in (1, 2):
        engine = Engine(model)
        prompt = Prompt("What is in the picture?", images=[random_image(seed)])
        ids = engine._encode(prompt).ids
        ours, done = answer(engine, prompt)
        assert done.timings["images_encoded"] == 1
        assert ours == factory.oracle_greedy(tiny.torch_model, ids, [random_image(seed)], N)
        answers.append(ours)
    assert answers[0] != answers[1]  # the image steers the answer


def test_follow_up_on_a_stored_prefix_matches_transformers(qwen3):
    tiny, model, factory = qwen3
    engine = Engine(model)
    image = random_image(4)
    answer(engine, Prompt("Describe it.", images=[image], image_key="f"), 3)
    follow = Prompt("What colour is the largest thing, and where is it? " * 2, images=[image], image_key="f")
    ours, done = answer(engine, follow)
    assert done.timings["prefix_reused"] and done.timings["images_encoded"] == 0
    assert ours == factory.oracle_greedy(tiny.torch_model, engine._encode(follow).ids, [image], N)


def test_three_turn_conversation_matches_transformers(qwen3):
    """Each turn's answer equals transformers' on the whole conversation so far (answers as
    generated, the first turn's image included); later turns prefill only their own rows."""
    tiny, model, factory = qwen3
    engine = Engine(model)
    image = random_image(5)
    questions = ["What is this?", "Why is it there?", "And what comes next?"]
    for turn, question in enumerate(questions):
        prompt = Prompt(question, images=[image] if turn == 0 else [], conversation="c")
        ours, done = answer(engine, prompt, 6)
        conversation = engine.conversations.get("c")
        prompt_ids = conversation.ids[:len(conversation.ids) - len(ours)]
        assert done.prompt_tokens == len(prompt_ids)
        if turn:
            assert 0 < done.timings["history_rows"] < len(prompt_ids)
        assert ours == factory.oracle_greedy(tiny.torch_model, prompt_ids, [image], 6), turn


def test_decode_after_an_image_keeps_the_rotary_position_apart_from_the_kv_row(qwen3):
    """The first decode step after a 9-token image (3 x 3 merged grid) is fed rotary position
    rows - 6 and writes KV row `rows`; the prompt's KV rows stay as prefill wrote them. Feeding
    the KV row as the position (StackFlow's decode loop, LLM.hpp line 2343) answers otherwise."""
    tiny, model, factory = qwen3
    engine = Engine(model)
    prompt = Prompt("What is in the picture?", images=[random_image(1)])
    ids = engine._encode(prompt).ids
    fed = []
    layer = model.layers[0]
    original = layer.run

    def recording(feed, group=0):
        if group == 0:
            fed.append(int(feed["indices"][0, 0]))
        return original(feed, group)

    layer.run = recording
    try:
        answer(engine, Prompt("What is in the picture?", images=[random_image(1)]), 1)
        prefilled = engine.cache.keys[:, :, :len(ids)].copy()
        ours, _ = answer(engine, prompt, 5)
    finally:
        del layer.run
    assert fed == [len(ids) - 6 + t for t in range(4)]  # max position + 1 = rows - (9 - 3)
    np.testing.assert_array_equal(engine.cache.keys[:, :, :len(ids)], prefilled)
    assert engine.cache.position == len(ids) + 4
    # decode fed the KV row as its rotary position (prefill's positions kept): another answer
    wrong = Engine(model)
    right_positions = wrong._rows.set_positions

    def kv_row_positions(ids, image_token_id):
        right_positions(ids, image_token_id)
        n, rope = len(ids), wrong._rows.rope
        rope[:, n:] = np.arange(n, n + rope.shape[1] - n, dtype=np.uint32)

    wrong._rows.set_positions = kv_row_positions
    assert answer(wrong, prompt, 5)[0] != ours
    assert ours == factory.oracle_greedy(tiny.torch_model, ids, [random_image(1)], 5)
