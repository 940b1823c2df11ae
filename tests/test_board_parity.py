"""The whole engine through AxEngineSession equals the reference path, token for token.

Here the compiled directories are stand-in builds (tests/fixtures_board.py) run by the
strict axengine stand-in and (`board_axengine`) by AXERA's own pyaxengine over the fake
board libraries; with `-m board` and $VLMD_BOARD_MODEL_DIR the board tests at
the end run the same engine on a real board.
"""

from __future__ import annotations

import os

import pytest

from npu.board.axengine_session import AxEngineSession
from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt, TokenEvent
from npu.model import load_model
from tests.fixtures_board import BOARD_BUILD
from tests.model_dims import random_image

QUESTION = "What is in this picture? Answer in detail please."


@pytest.fixture(scope="module")
def reference_model(tiny_internvl_native):
    return load_model(tiny_internvl_native.path, backend="reference", precision="bf16", **BOARD_BUILD)


def generate(model, prompt: Prompt, options: GenerationOptions) -> tuple[list[int], DoneEvent]:
    events = list(Engine(model).generate(prompt, options))
    return [e.token_id for e in events if isinstance(e, TokenEvent)], events[-1]


@pytest.mark.parametrize("kind", ["axera", "m5stack"])
def test_greedy_answer_equals_reference(kind, board_axengine, axera_board_dir, m5stack_board_dir, reference_model):
    board = load_model(board_axengine.dir(axera_board_dir if kind == "axera" else m5stack_board_dir),
                       backend="axengine")
    assert board.backend == "axengine" and all(isinstance(s, AxEngineSession) for s in board.layers)
    prompt = Prompt(QUESTION, images=[random_image(3, 180, 240)])
    options = GenerationOptions(max_tokens=10, ignore_stop=True)
    board_ids, board_done = generate(board, prompt, options)
    reference_ids, reference_done = generate(reference_model, prompt, options)
    assert len(board_ids) == 10
    assert board_ids == reference_ids
    assert board_done.text == reference_done.text
    assert board_done.prompt_tokens == reference_done.prompt_tokens > 2 * BOARD_BUILD["prefill_chunk"]


def test_sampled_text_only_and_follow_up_equal_reference(board_axengine, axera_board_dir, reference_model):
    board = load_model(board_axengine.dir(axera_board_dir), backend="axengine")
    options = GenerationOptions(max_tokens=6, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_stop=True)
    prompt = Prompt("Tell me a story about a cat and a lighthouse.")
    assert generate(board, prompt, options)[0] == generate(reference_model, prompt, options)[0]
    # A follow-up on the same image reuses the KV prefix on both sides and still agrees.
    image = random_image(5)
    sides = []
    for model in (board, reference_model):
        engine = Engine(model)
        first = list(engine.generate(Prompt("Describe it.", [image], image_key="cam:1"), GenerationOptions(max_tokens=4)))
        second = list(engine.generate(Prompt("And the colours?", [image], image_key="cam:1"), GenerationOptions(max_tokens=6)))
        assert second[-1].timings["prefix_reused"] is True
        sides.append([e.token_id for e in first + second if isinstance(e, TokenEvent)])
    assert sides[0] == sides[1]


def test_manifest_directory_runs_like_reference(board_axengine, axera_board_dir, tmp_path, reference_model):
    """Any other naming works through vlmd.toml: here every file renamed, the tokenizer in a subfolder."""
    source = board_axengine.dir(axera_board_dir)  # symlinks resolve: the sessions are per real file
    renamed = {"vision.axmodel": "intervl_vision_part_224.axmodel", "head.axmodel": "qwen2_post.axmodel",
               "rows.bin": "model.embed_tokens.weight.bfloat16.bin"}
    renamed.update({f"block{i}.axmodel": f"qwen2_p32_l{i}_together.axmodel" for i in range(2)})
    for new_name, old_name in renamed.items():
        (tmp_path / new_name).symlink_to(source / old_name)
    (tmp_path / "tok").symlink_to(source.parent / "internvl2_tiny_tokenizer")
    (tmp_path / "vlmd.toml").write_text(
        '[model]\nvision = "vision.axmodel"\nlayers = "block{i}.axmodel"\nnum_layers = 2\npost = "head.axmodel"\n'
        'embeddings = "rows.bin"\ntokenizer = "tok"\ntemplate = "Hermes-2"\n')
    board = load_model(tmp_path, backend="axengine")
    prompt, options = Prompt(QUESTION, images=[random_image(6)]), GenerationOptions(max_tokens=4, ignore_stop=True)
    assert generate(board, prompt, options)[0] == generate(reference_model, prompt, options)[0]


def test_public_path_feeds_axengine_its_kv_cache_itself(board_axengine, axera_board_dir, monkeypatch):
    import numpy as np

    board = load_model(board_axengine.dir(axera_board_dir), backend="axengine", data_path="public")
    engine = Engine(board)
    raw = board.layers[1]._session
    original, fed = raw.run, []

    def spy(output_names, input_feed, run_options=None, shape_group=0):
        if shape_group == 0:
            fed.append(input_feed)
        return original(output_names, input_feed, run_options, shape_group)

    monkeypatch.setattr(raw, "run", spy)
    list(engine.generate(Prompt("Hi there."), GenerationOptions(max_tokens=3, ignore_stop=True)))
    assert fed, "no decode step reached axengine"
    for feed in fed:  # the cache rows go to axengine as views of the engine's one cache: no host copy
        assert np.shares_memory(feed["K_cache"], engine.cache.keys[1])
        assert np.shares_memory(feed["V_cache"], engine.cache.values[1])


def test_loading_again_reuses_the_sessions(axengine_standin, axera_board_dir):
    first = load_model(axera_board_dir, backend="axengine")
    created = axengine_standin.STATS.sessions_created
    second = load_model(axera_board_dir, backend="axengine")
    assert axengine_standin.STATS.sessions_created == created  # no new CMM buffers on reload
    assert second.layers[0] is first.layers[0]


def test_topk_post_build_decodes_greedily_like_reference(board_axengine, tiny_internvl_native, tmp_path,
                                                         reference_model):
    from tests.fixtures_board import build_board_dir

    model_dir = build_board_dir(tiny_internvl_native.path, tmp_path, "axera", post_topk=5)
    board = load_model(model_dir, backend="axengine")
    assert board.describe()["post_topk"] is True
    prompt = Prompt(QUESTION, images=[random_image(4)])
    options = GenerationOptions(max_tokens=5, ignore_stop=True)
    assert generate(board, prompt, options)[0] == generate(reference_model, prompt, options)[0]


# --- on a real board ------------------------------------------------------------------------------


@pytest.mark.board
def test_board_model_loads_inspects_and_answers(board_model_dir):
    from npu.inspect import inspect_model

    report = inspect_model(board_model_dir)
    assert report["problems"] == [], report["problems"]
    model = load_model(board_model_dir, backend="axengine")
    image = random_image(0, 480, 640) if model.vision is not None else None
    ids, done = generate(model, Prompt("Describe the image.", [image] if image is not None else []),
                         GenerationOptions(max_tokens=8))
    assert ids and done.finish_reason in ("stop", "length")
    assert load_model(board_model_dir, backend="axengine").layers[0] is model.layers[0]


@pytest.mark.board
def test_board_model_is_faithful_to_its_checkpoint(board_model_dir):
    reference_dir = os.environ.get("VLMD_BOARD_REFERENCE_DIR")
    if not reference_dir:
        pytest.skip("board test: set VLMD_BOARD_REFERENCE_DIR to the Hugging Face checkpoint of the board model")
    from daemon.commands.check import compare_graphs

    model = load_model(board_model_dir, backend="axengine")
    shapes = model.shapes()
    reference = load_model(reference_dir, backend="reference", precision="fp32", kv_capacity=shapes.capacity,
                           prefill_chunk=shapes.chunk, history_lengths=sorted(shapes.history_groups))
    image = random_image(0, *shapes.vision_size) if shapes.vision_size else None
    report = compare_graphs(model, reference, "Describe the image in detail.", image)
    assert report["top1_agreement"] >= 0.9, report


@pytest.mark.board
def test_board_zero_copy_path_proves_itself_and_answers_like_the_public_path(board_model_dir):
    """On a real board: the zero-copy path passes its self-check (or says why not) and gives the public path's tokens."""
    from daemon.commands.bench import Meter, bench_once

    zero_copy = load_model(board_model_dir, backend="axengine")
    facts = zero_copy.describe()["data_path"]
    if facts["data_path"] != "zero-copy":
        pytest.fail(f"the zero-copy path stepped aside on this board: {facts['reason']}")
    public = load_model(board_model_dir, backend="axengine", data_path="public")
    image = random_image(1, 480, 640) if zero_copy.vision is not None else None
    prompt = Prompt("Describe the image.", [image] if image is not None else [])
    options = GenerationOptions(max_tokens=16, ignore_stop=True)
    result = bench_once(Engine(zero_copy), Meter(), prompt, options)
    assert result["tokens"] == generate(public, prompt, options)[0]
    s = zero_copy.shapes()
    # per decode token: layer 0's input row, the position, one mask slot, every layer's K and V row, the post row
    assert result["device_written_per_token"] == 2 * s.hidden * 2 + 4 + 2 + s.n_layers * 2 * s.kv_dim * 2
