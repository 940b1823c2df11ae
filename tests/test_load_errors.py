"""Model-loading errors reach people as one line naming the part (issue 16 item 7).

`npu.model.load_model` is the boundary: whatever a part raises (a corrupt tokenizer.json
makes the tokenizers library raise a bare Exception, a truncated safetensors file its own
error type, an unknown template a ValueError, a board package its axengine errors) leaves
it as one `ModelError` naming the part. `vlmd serve`, `ask`, `bench`, `check` and
`model inspect`, run as real processes on broken copies of real models, print no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import EX_CONFIG
from npu.model import DEMO_MODEL_DIR, ModelError, load_model
from tests.fixtures_board import STANDIN_ROOT

REPO = Path(__file__).resolve().parents[1]


def broken_demo(tmp_path: Path, what: str) -> Path:
    model = tmp_path / f"demo-{what}"
    shutil.copytree(DEMO_MODEL_DIR, model)
    if what == "tokenizer":
        (model / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    elif what == "weights":
        weights = model / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    elif what == "template":
        config = json.loads((model / "config.json").read_text())
        config["template"] = "no-such-template"
        (model / "config.json").write_text(json.dumps(config))
    return model


def broken_board(tmp_path: Path, board_dir: Path) -> Path:
    copy = tmp_path / "board"
    shutil.copytree(board_dir.parent, copy)
    model = copy / board_dir.name
    from npu.board.layout import detect_layout

    tokenizer_dir = detect_layout(model).tokenizer_dir
    for name in ("tokenizer.json", "vocab.json"):
        if (tokenizer_dir / name).is_file():
            (tokenizer_dir / name).write_text("not json at all")
    return model


PARTS = {"tokenizer": "tokenizer", "weights": "checkpoint graphs", "template": "template"}


@pytest.mark.parametrize("what", sorted(PARTS))
def test_load_model_names_the_part(tmp_path, what):
    with pytest.raises(ModelError) as raised:
        load_model(broken_demo(tmp_path, what))
    assert raised.value.part == PARTS[what]
    assert f": {PARTS[what]}: " in str(raised.value)


def test_a_board_package_with_a_broken_tokenizer_names_the_tokenizer(tmp_path, axera_board_dir, axengine_standin):
    with pytest.raises(ModelError) as raised:
        load_model(broken_board(tmp_path, axera_board_dir), backend="axengine")
    assert raised.value.part == "tokenizer" and "tokenizer: " in str(raised.value)


def vlmd(tmp_path: Path, *argv: str, standin: bool = False) -> subprocess.CompletedProcess:
    path = f"{REPO}:{STANDIN_ROOT}" if standin else str(REPO)  # the stand-in plays axengine
    env = {**os.environ, "PYTHONPATH": path, "VLMD_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([sys.executable, "-m", "daemon.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def one_line_naming(result: subprocess.CompletedProcess, part: str) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert part in lines[0]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("what", sorted(PARTS))
def test_every_command_prints_one_line_for_a_broken_checkpoint(tmp_path, what):
    model, part = str(broken_demo(tmp_path, what)), PARTS[what]
    for argv in (["ask", "--model", model, "hi"], ["bench", "--model", model, "--runs", "1"],
                 ["check", "--model", model, "--reference", str(DEMO_MODEL_DIR)]):
        result = vlmd(tmp_path, *argv)
        assert result.returncode != 0, argv
        one_line_naming(result, f": {part}: ")
    served = vlmd(tmp_path, "serve", "--model", model, "--device-id", "broken", "--broker", "mqtt://127.0.0.1:1")
    assert served.returncode == EX_CONFIG
    assert "Traceback" not in served.stderr
    errors = [json.loads(line) for line in served.stderr.splitlines()
              if line.startswith("{") and json.loads(line)["level"] == "error"]
    assert [e["event"] for e in errors] == ["cannot load the model"] and f": {part}: " in errors[0]["error"]
    inspected = vlmd(tmp_path, "model", "inspect", model)
    assert inspected.returncode in (1, 2) and "Traceback" not in inspected.stderr + inspected.stdout
    assert part.split()[0] in inspected.stdout + inspected.stderr


@pytest.mark.slow
def test_serve_on_a_board_package_with_a_broken_tokenizer(tmp_path, axera_board_dir):
    model = str(broken_board(tmp_path, axera_board_dir))
    served = vlmd(tmp_path, "serve", "--model", model, "--device-id", "broken", "--broker", "mqtt://127.0.0.1:1",
                  standin=True)
    assert served.returncode == EX_CONFIG, served.stderr
    (error,) = [json.loads(line) for line in served.stderr.splitlines()
                if line.startswith("{") and json.loads(line)["level"] == "error"]
    assert error["event"] == "cannot load the model" and ": tokenizer: " in error["error"]
    one_line_naming(vlmd(tmp_path, "ask", "--model", model, "hi", standin=True), ": tokenizer: ")
