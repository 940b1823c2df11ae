"""Every published package (tests/fixtures_published.py) through what a user runs: `vlmd model
inspect` (no problems), `vlmd ask` with an image (the image is in the prompt), `vlmd check`
against its checkpoint (faithful), `vlmd bench`, all on the axengine stand-in; and the
engine's greedy answer on the package equals the reference backend's on the checkpoint,
token for token, cold and for a follow-up prefilled at the snapshot's offset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from daemon.cli import main
from npu.engine import Engine, GenerationOptions, Prompt, TokenEvent
from npu.model import load_model
from tests import model_factory
from tests.fixtures_published import PUBLISHED

QUESTION = "What is in this picture? Answer in detail please."
# Each package by the path a user gives: M5Stack's model folder; AXERA's repository root
# and, for one of them, the model folder inside it.
TARGETS = [(name, None) for name in PUBLISHED] + [("InternVL2_5-1B", "internvl2_5_1b_364_ax630c"),
                                                  ("InternVL3-1B", "internvl3_1b_ax650")]
IDS = [name if folder is None else f"{name}/{folder}" for name, folder in TARGETS]


@pytest.fixture(params=TARGETS, ids=IDS)
def target(request, published_package, axengine_standin):
    name, folder = request.param
    package, path, checkpoint = published_package(name)
    return package, (path / folder if folder else path), checkpoint


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_inspect_reports_the_package_as_it_ships(target, capsys):
    package, path, _ = target
    code, out = cli(capsys, "model", "inspect", "--json", path)
    report = json.loads(out)
    assert code == 0 and report["problems"] == [], out
    facts = report["facts"]
    size = package.image_size
    assert facts["image_size"] == [size, size] and facts["image_tokens"] == model_factory.n_image_tokens(size)
    assert facts["vision_input"] == ("float32 NCHW" if package.build.vision_input == "float32_nchw" else "uint8 NHWC")
    assert facts["vision_dtype"] == ("float32" if package.build.vision_output == "fp32" else "bfloat16")
    assert facts["prefill_chunk"] == package.build.prefill_chunk and facts["kv_capacity"] == package.build.kv_capacity
    assert facts["history_lengths"] == list(package.build.history_lengths)
    assert report["tokenizer"]["image_context_tokens"] == facts["image_tokens"]
    expected_template = "Hermes-2" if package.family == "internvl2" else "internvl2_5"
    assert report["tokenizer"]["template"] == expected_template
    if package.maker == "m5stack" or package.options.get("empty_config"):
        assert "assumed from the package name" in report["template_source"]
    else:
        assert report["template_source"] == "config.json"
    if package.options.get("empty_config"):
        assert any("empty (0 bytes)" in note for note in report["notes"])
    if package.name.startswith("internvl3"):  # the mode file's own sampling fields
        assert report["sampling_defaults"] == {"temperature": 0.7, "top_k": 40, "top_p": 1.0}
    elif package.name.startswith("InternVL3"):  # AXERA's post_config.json
        assert report["sampling_defaults"] == {"temperature": 0.9, "top_k": 10, "top_p": 1.0}
    else:
        assert report["sampling_defaults"] == {}


def test_ask_with_an_image_uses_it(target, capsys, tmp_path):
    package, path, _ = target
    image_path = tmp_path / "frame.jpg"
    Image.fromarray(model_factory.random_image(2, 240, 320)).save(image_path, quality=95)
    code, out = cli(capsys, "ask", "--model", path, "--image", image_path, "--max-tokens", "3", "--json", QUESTION)
    assert code == 0, out
    final = last_json(out)
    assert final["finish_reason"] in ("stop", "length") and final["error"] is None
    text_only = last_json(cli(capsys, "ask", "--model", path, "--max-tokens", "1", "--json", QUESTION)[1])
    image_tokens = model_factory.n_image_tokens(package.image_size)
    # <img> + N x <IMG_CONTEXT> + </img> + "\n" are in the prompt with the image, not without it
    assert final["usage"]["prompt_tokens"] == text_only["usage"]["prompt_tokens"] + image_tokens + 3
    assert final["timings"]["images_encoded"] == 1


def test_check_against_its_checkpoint_is_faithful(target, capsys):
    package, path, checkpoint = target
    code, out = cli(capsys, "check", "--model", path, "--reference", checkpoint.path, "--max-tokens", "4", "--json")
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and report["verdict"] == "faithful", out
    assert report["answers"]["identical"] is True
    assert any(row["graph"] == "vision" and row["cosine"] > 0.999 for row in report["graphs"])


def test_bench_runs(target, capsys):
    _, path, _ = target
    code, out = cli(capsys, "bench", "--model", path, "--runs", "1", "--max-tokens", "2", "--json")
    assert code == 0, out
    bench = last_json(out)["bench"]
    assert bench["completion_tokens"] == 2 and bench["prompt_tokens"] > 0 and bench["image_ms"] > 0


@pytest.fixture(scope="module")
def reference_models():
    made = {}

    def get(package, checkpoint):
        if package.name not in made:
            made[package.name] = load_model(checkpoint.path, backend="reference", precision="bf16",
                                            **package.build.reference_options())
        return made[package.name]

    return get


def greedy(engine, prompt, n=8) -> list[int]:
    events = list(engine.generate(prompt, GenerationOptions(max_tokens=n, ignore_stop=True)))
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


def test_greedy_answers_equal_the_reference_token_for_token(target, reference_models):
    package, path, checkpoint = target
    board = load_model(path, backend="axengine")
    assert board.describe()["data_path"]["data_path"] == "zero-copy"  # the KV cache in the graphs' own buffers
    reference = reference_models(package, checkpoint)
    assert board.shapes().history_groups.keys() == reference.shapes().history_groups.keys()
    image = model_factory.random_image(3, 180, 240)
    sides = []
    for model in (board, reference):
        engine = Engine(model, prefix_replay="never")
        first = greedy(engine, Prompt(QUESTION, [image], image_key="cam:1"))
        # a follow-up on the same image: its rows are prefilled from the snapshot's end
        follow_up = Prompt("And which colours do you see? " * 3, [image], image_key="cam:1")
        events = list(engine.generate(follow_up, GenerationOptions(max_tokens=6, ignore_stop=True)))
        assert events[-1].timings["prefix_reused"] is True
        sides.append((first, [e.token_id for e in events if isinstance(e, TokenEvent)]))
    assert sides[0] == sides[1]
    assert np.all([len(first) == 8 for first, _ in sides])


def test_package_sampling_defaults_apply_unless_a_request_or_config_says_otherwise(
        published_package, axengine_standin, capsys, monkeypatch):
    _, path, _ = published_package("internvl3-1B-448-ax630c")
    model = load_model(path, backend="axengine")
    assert model.sampling_defaults == {"temperature": 0.7, "top_k": 40, "top_p": 1.0}
    assert load_model(path, backend="axengine", sampling={"temperature": 0.0}).sampling_defaults == {
        "temperature": 0.0, "top_k": 40, "top_p": 1.0}
    assert model.preprocess.resize == "bicubic"  # as InternVL was trained
    assert load_model(path, backend="axengine", resize="bilinear").preprocess.resize == "bilinear"
    seen = []
    original = Engine.generate

    def recording(self, prompt, options=None, should_stop=None):
        seen.append(options)
        return original(self, prompt, options, should_stop)

    monkeypatch.setattr(Engine, "generate", recording)
    assert cli(capsys, "ask", "--model", path, "--max-tokens", "2", "--seed", "1", "Hi")[0] == 0
    assert cli(capsys, "ask", "--model", path, "--max-tokens", "2", "--temperature", "0", "--top-k", "3", "Hi")[0] == 0
    assert (seen[0].temperature, seen[0].top_k, seen[0].top_p, seen[0].seed) == (0.7, 40, 1.0, 1)
    assert (seen[1].temperature, seen[1].top_k) == (0.0, 3)
