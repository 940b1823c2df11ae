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
from npu.text.tokenizer import Tokenizer
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


def _cli(capsys, *argv) -> tuple[int, str]:
    from daemon.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", SHIPPED)
def test_what_a_user_runs_on_each_package(name, smolvlm_package, tiny_smolvlm, axengine_standin, capsys, tmp_path):
    """`vlmd model inspect` (no problems, the SmolVLM family), `vlmd ask` with an image (its
    <fake_token_around_image><global-img> + 64 <image> + <fake_token_around_image> in the prompt),
    `vlmd check` against the checkpoint (faithful) and `vlmd bench`, on the stand-in."""
    from PIL import Image

    from tests.smolvlm_factory import sample_image

    root = smolvlm_package(name)
    code, out = _cli(capsys, "model", "inspect", "--json", root)
    report = json.loads(out)
    assert code == 0 and report["problems"] == [], out
    assert report["tokenizer"]["family"] == "smolvlm" and report["tokenizer"]["image_context_tokens"] == 64
    assert report["facts"]["vision_input"] == "uint8 NHWC" and report["facts"]["vision_dtype"] == "float32"
    image_path = tmp_path / "frame.png"
    Image.fromarray(sample_image(3)).save(image_path)
    code, out = _cli(capsys, "ask", "--model", root, "--image", image_path, "--max-tokens", "3", "--json",
                     "What is in the image?")
    assert code == 0, out
    with_image = _last_json(out)
    text_only = _last_json(_cli(capsys, "ask", "--model", root, "--max-tokens", "1", "--json", "What is in the image?")[1])
    assert with_image["timings"]["images_encoded"] == 1
    # the image block is 2 + 64 + 1 tokens after "User:"; without it "User: " + question, the space
    # joining the question's first word (as transformers tokenises it)
    tok = Tokenizer.from_dir(root / "tokenizer")
    question = "What is in the image?"
    spaced = len(tok.encode(question)) - len(tok.encode(" " + question))
    assert with_image["usage"]["prompt_tokens"] == text_only["usage"]["prompt_tokens"] + 67 + spaced
    code, out = _cli(capsys, "check", "--model", root, "--reference", tiny_smolvlm.path, "--max-tokens", "4", "--json")
    check = _last_json(out)
    assert code == 0 and check["verdict"] == "faithful" and check["answers"]["identical"] is True, out
    code, out = _cli(capsys, "bench", "--model", root, "--runs", "1", "--max-tokens", "2", "--json")
    assert code == 0 and _last_json(out)["bench"]["image_ms"] > 0, out


def test_answers_on_both_data_paths_equal_the_reference_backend(smolvlm_package, tiny_smolvlm, axengine_standin):
    from npu.engine import Engine, GenerationOptions, Prompt, TokenEvent
    from npu.model import load_model
    from tests.smolvlm_factory import sample_image

    def answer(model) -> list[int]:
        engine, image = Engine(model), sample_image(5)
        tokens = []
        for prompt in (Prompt("What is in the image?", images=[image], image_key="f"),
                       Prompt("And the colour?", images=[image], image_key="f")):  # a follow-up at an offset
            tokens.append([e.token_id for e in engine.generate(prompt, GenerationOptions(max_tokens=6))
                           if isinstance(e, TokenEvent)])
        return tokens

    root = smolvlm_package("smolvlm-256M-ax630c")
    reference = answer(load_model(tiny_smolvlm.path, backend="reference", precision="bf16", kv_capacity=KV_CAPACITY,
                                  prefill_chunk=PREFILL_CHUNK))
    for data_path in ("public", "zero-copy"):
        model = load_model(root, data_path=data_path)
        assert model.family.name == "smolvlm" and model.data_path.describe()["data_path"] == data_path
        assert answer(model) == reference, data_path
