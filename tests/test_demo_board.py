"""The demo model in board layout: the same captions through axengine as through the reference.

The shipped demo checkpoint is exported the way a board package ships (AXERA llm_build
layout: per-graph stand-in .axmodel files, the bf16 embedding file written by
npu.embeddings.export_embeddings, the tokenizer folder with config.json), then run by
the axengine stand-in. Because the demo model means something, this checks more than
parity: the board path's captions must also name the right colours, places and count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from daemon.commands.demo import scenes
from tests.fixtures_board import BOARD_BUILD, build_board_dir

DEMO_DIR = Path(__file__).resolve().parents[1] / "npu" / "assets" / "demo_model"
# Fresh scenes: not the training streams, and not the seeds test_demo_model.py uses.
SEEDS = range(9_000_500, 9_000_504)
CAPTION_PROMPT = "Describe the image shortly."


@pytest.fixture(scope="module")
def demo_board_dir(tmp_path_factory) -> Path:
    if not (DEMO_DIR / "model.safetensors").is_file():
        pytest.skip(f"demo model not built at {DEMO_DIR} (python tools/train_demo_model.py)")
    return build_board_dir(DEMO_DIR, tmp_path_factory.mktemp("demo-axera"), "axera")


def captions(model, images: list[np.ndarray]) -> list[tuple[list[int], str]]:
    """(token ids, text) of the greedy caption of each image."""
    from npu.engine import DoneEvent, Engine, GenerationOptions, Prompt, TokenEvent

    engine, out = Engine(model), []
    for rgb in images:
        events = list(engine.generate(Prompt(CAPTION_PROMPT, images=[rgb]), GenerationOptions(max_tokens=40)))
        done = events[-1]
        assert isinstance(done, DoneEvent) and done.finish_reason == "stop", done
        out.append(([e.token_id for e in events if isinstance(e, TokenEvent)], done.text))
    return out


def test_board_layout_holds_the_demo_model(demo_board_dir):
    config = json.loads((DEMO_DIR / "config.json").read_text())
    text = config["text_config"]
    embeddings = demo_board_dir / "model.embed_tokens.weight.bfloat16.bin"
    # raw bf16 rows, [vocab, hidden], no header
    assert embeddings.stat().st_size == text["vocab_size"] * text["hidden_size"] * 2
    layer_files = sorted(p.name for p in demo_board_dir.glob("qwen2_p*_l*_together.axmodel"))
    assert len(layer_files) == text["num_hidden_layers"]
    assert (demo_board_dir / "intervl_vision_part_224.axmodel").is_file()
    assert (demo_board_dir.parent / "internvl2_tiny_tokenizer" / "tokenizer.json").is_file()


def test_board_captions_equal_reference_and_are_right(axengine_standin, demo_board_dir):
    from npu.board.axengine_session import AxEngineSession
    from npu.model import load_model

    board = load_model(demo_board_dir, backend="axengine")
    assert board.backend == "axengine" and all(isinstance(s, AxEngineSession) for s in board.layers)
    reference = load_model(DEMO_DIR, backend="reference", precision="bf16", **BOARD_BUILD)
    drawn = [scenes.draw_scene(seed) for seed in SEEDS]
    images = [np.asarray(image) for image, _ in drawn]  # (240, 320, 3) uint8 each
    board_out, reference_out = captions(board, images), captions(reference, images)
    assert [ids for ids, _ in board_out] == [ids for ids, _ in reference_out]
    assert [text for _, text in board_out] == [text for _, text in reference_out]
    wanted = [scene.caption() for _, scene in drawn]
    got = [text for _, text in board_out]
    assert [scenes.without_kinds(t) for t in got] == [scenes.without_kinds(w) for w in wanted], list(zip(got, wanted))


def test_inspect_reports_no_problems(axengine_standin, demo_board_dir, capsys):
    from daemon.cli import main

    code = main(["model", "inspect", "--json", str(demo_board_dir)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    report = json.loads(out)
    assert report["layout"] == "axera"
    assert report["problems"] == []
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert report["embedding_rows"] == config["text_config"]["vocab_size"]
    assert report["facts"]["n_layers"] == config["text_config"]["num_hidden_layers"]
    assert report["facts"]["image_tokens"] == 64
    assert report["template"] == "Hermes-2"
