"""M5Stack's Qwen3-VL packages (qwen3-vl-2B-Int4-ax630c / -ax650, tests/fixtures_published.py) as
they ship, on the axengine stand-in: `vlmd model inspect` finds and explains them with no
problems, and the engine's greedy answer (an image, then a follow-up on its prefix) equals the
reference backend's on the checkpoint, on the public and the zero-copy data paths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daemon.cli import main
from npu.engine import Engine, GenerationOptions, Prompt
from npu.model import load_model
from tests.fixtures_board import write_cmm_info
from tests.fixtures_published import QWEN3_VL_PUBLISHED
from tests.model_dims import random_image

NAMES = list(QWEN3_VL_PUBLISHED)


@pytest.fixture(params=NAMES)
def package(request, published_package, axengine_standin, tmp_path, monkeypatch):
    if request.param.endswith("ax650"):  # the package declares cmm_size 3.4 GiB: an AX650N board's CMM (6 GiB assumed)
        monkeypatch.setenv("VLMD_AX_PROC", str(write_cmm_info(tmp_path / "ax_proc", 6 * 1024 * 1024, 18876)))
    return published_package(request.param)


def test_inspect_explains_the_package(package, capsys):
    published, path, _ = package
    code = main(["model", "inspect", "--json", str(path)])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == 0 and report["problems"] == [], out + err
    facts = report["facts"]
    assert facts["family"] == "qwen3_vl" and facts["index_rows"] == 3
    assert facts["vision_input"] == "uint8 patches" and facts["image_size"] == [96, 96] and facts["image_tokens"] == 9
    assert facts["prefill_chunk"] == published.build.prefill_chunk
    assert facts["history_lengths"] == list(published.build.history_lengths)
    assert report["tokenizer"]["image_context_tokens"] == 9 and report["tokenizer"]["family"] == "qwen3_vl"
    assert report["tokenizer"]["template"] == "qwen2-chatml" and "tokenizer_qwen3-vl" in report["template_source"]


def _answers(model, image):
    engine = Engine(model)
    out = []
    for key, text in (("f", "What is in the picture?"), ("f", "And what colour is the biggest thing? " * 2)):
        events = list(engine.generate(Prompt(text, images=[image], image_key=key),
                                      GenerationOptions(max_tokens=6, ignore_stop=True)))
        out.append(([e.token_id for e in events[:-1]], events[-1].timings["prefix_reused"]))
    return out


@pytest.mark.parametrize("data_path", ["public", "zero-copy"])
def test_greedy_answers_equal_the_reference_backend(package, data_path):
    published, path, checkpoint = package
    board = load_model(path, backend="axengine", data_path=data_path)
    assert board.family.name == "qwen3_vl" and board.data_path.describe()["data_path"] == data_path
    reference = load_model(checkpoint.path, backend="reference", precision="bf16", **published.build.reference_options())
    reference.template = board.template  # the package's prompt (StackFlow's ChatML), the checkpoint's graphs
    image = random_image(6, 120, 160)
    ours, expected = _answers(board, image), _answers(reference, image)
    assert ours == expected and ours[1][1]  # the follow-up reused the image prefix
    assert len(set(ours[0][0])) > 1
