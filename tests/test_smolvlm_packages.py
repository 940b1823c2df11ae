"""M5Stack's SmolVLM packages (tests/fixtures_smolvlm.py) found where StackFlow finds them, and their
graphs as the axengine stand-in serves them: the reference graphs' contracts, the same numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from npu.board.layout import detect_layout
from npu.board.m5stack import find_mode_file
from npu.reference.smolvlm_graphs import build_smolvlm_sessions
from npu.session import BF16
from tests.fixtures_smolvlm import KV_CAPACITY, PREFILL_CHUNK, REAL_MODE_FILES, SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_package_is_found_as_stackflow_finds_it(name, smolvlm_package, tiny_smolvlm):
    root = smolvlm_package(name)
    assert find_mode_file(root) == root.parent / "models" / f"mode_{name}.json"
    layout = detect_layout(root)
    params = REAL_MODE_FILES[name]["mode_param"]
    assert layout.kind == "m5stack" and not layout.problems, layout.problems
    assert layout.vision.name == params["filename_vpm_resampler_axmodedl"]
    assert [p.name for p in layout.layers] == ["llama_p128_l0_together.axmodel", "llama_p128_l1_together.axmodel"]
    assert layout.post.name == "llama_post.axmodel" and layout.embeddings.name == params["filename_tokens_embed"]
    assert (layout.image_context_id, layout.vocab_size) == (49190, 49280)
    assert layout.tokenizer_dir == root / "tokenizer"
    assert layout.mode_params["tokens_embed_size"] == tiny_smolvlm.config["text_config"]["hidden_size"]


def test_the_500m_ax650_mode_file_is_read_by_its_name_not_its_mode_field(smolvlm_package):
    """StackFlow d9084ba's mode_smolvlm-500M-ax650.json says "mode": "smolvlm-500M-ax630c"; StackFlow
    opens it by the requested name, so vlmd takes the folder the file's name says, and notes it."""
    root = smolvlm_package("smolvlm-500M-ax650")
    mode_file = root.parent / "models" / "mode_smolvlm-500M-ax650.json"
    assert json.loads(mode_file.read_text())["mode"] == "smolvlm-500M-ax630c"
    for path in (root, mode_file):
        layout = detect_layout(path)
        assert layout.root == root and not layout.problems, layout.problems
        assert any("smolvlm-500M-ax630c" in note for note in layout.notes)


def test_the_standin_serves_the_smolvlm_graph_contracts(smolvlm_package, tiny_smolvlm, axengine_standin):
    root = smolvlm_package("smolvlm-256M-ax630c")
    vision = axengine_standin.InferenceSession(str(root / "SmolVLM-256M-Instruct_vision_nhwc.axmodel"))
    (image,) = vision.get_inputs()
    assert (image.name, tuple(image.shape)) == ("pixel_values", (1, 128, 128, 3))
    layer = axengine_standin.InferenceSession(str(root / "llama_p128_l0_together.axmodel"))
    decode = {i.name: tuple(i.shape) for i in layer.get_inputs(shape_group=0)}
    prefill = {i.name: tuple(i.shape) for i in layer.get_inputs(shape_group=1)}
    assert decode["indices"] == (1, 1) and prefill["indices"] == (1, PREFILL_CHUNK)
    assert decode["mask"] == (1, 1, KV_CAPACITY + 1) and prefill["K_cache"] == (1, 1, 64)

    from tests.smolvlm_factory import sample_image

    picture = sample_image(7)[None]
    got = vision.run(None, {"pixel_values": picture})[0]
    reference = build_smolvlm_sessions(tiny_smolvlm.path, kv_capacity=KV_CAPACITY, prefill_chunk=PREFILL_CHUNK)
    np.testing.assert_array_equal(got, reference.vision.run({"pixel_values": picture})[0])
    feed = {"K_cache": np.zeros((1, 1, 64), BF16), "V_cache": np.zeros((1, 1, 64), BF16),
            "indices": np.arange(PREFILL_CHUNK, dtype=np.uint32)[None],
            "input": np.random.default_rng(0).standard_normal((1, PREFILL_CHUNK, 64)).astype(BF16),
            "mask": np.zeros((1, PREFILL_CHUNK, PREFILL_CHUNK), BF16)}
    got = layer.run(None, feed, shape_group=1)
    want = reference.layers[0].run(feed, 1)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
