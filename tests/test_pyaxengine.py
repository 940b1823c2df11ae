"""pyaxengine as it is installed (npu/board/pyaxengine.py): versions, bf16, its prints, the provider.

Each test runs a stand-in emulating one pyaxengine release or board (tests/axengine_standin,
$VLMD_STANDIN_*), so the messages are checked against what those releases really do.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from npu.errors import ModelError
from npu.model import load_model
from tests.fixtures_board import STANDIN_ENV, STANDIN_ROOT, build_board_dir
from tests.test_demo_board import DEMO_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def board_dir(tmp_path, tiny_internvl_native):
    return build_board_dir(tiny_internvl_native.path, tmp_path / "board", "axera")


def test_pyaxengine_0_1_1_is_refused_with_what_to_install(standin_release, board_dir):
    standin_release(VLMD_STANDIN_PYAXENGINE="0.1.1rc0")
    with pytest.raises(ModelError) as caught:
        load_model(board_dir, backend="axengine")
    message = str(caught.value)
    assert "pyaxengine 0.1.1 has no shape groups" in message and "install pyaxengine >= 0.1.2" in message
    assert "layer0 has 3" in message


def test_a_libax_engine_without_bf16_is_explained(standin_release, board_dir):
    standin_release(VLMD_STANDIN_NO_BF16="1", VLMD_STANDIN_ENGINE_VERSION="2.6.3s")
    with pytest.raises(ModelError) as caught:
        load_model(board_dir, backend="axengine")
    message = str(caught.value)
    assert "this board's libax_engine (engine version 2.6.3s) cannot report bf16 tensors" in message
    assert "Unsupported data type '0'." in message and "AX620E SDK >= 3.12" in message
    assert "AX650 SDK >= 2.18" in message and "libax_engine.so" in message


@pytest.fixture
def importable_standin(monkeypatch, board_proc_dir):
    """The stand-in importable by name, as an installed wheel is: vlmd's own import runs its prints."""
    import npu.board.pyaxengine as pyaxengine

    for name in STANDIN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLMD_AX_PROC", str(board_proc_dir))
    for name in [n for n in sys.modules if n == "axengine" or n.startswith("axengine.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(STANDIN_ROOT))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.setattr(pyaxengine, "_RUNTIME", None)
    yield
    for name in [n for n in sys.modules if n == "axengine" or n.startswith("axengine.")]:
        del sys.modules[name]


def test_what_pyaxengine_prints_goes_to_the_debug_log_not_stdout(importable_standin, board_dir, capfd, caplog):
    with caplog.at_level(logging.DEBUG, logger="npu.board.pyaxengine"):
        model = load_model(board_dir, backend="axengine")
    out, err = capfd.readouterr()
    assert "[INFO]" not in out and "[INFO]" not in err
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "pyaxengine (import): [INFO] Available providers:  ['AxEngineExecutionProvider']" in lines
    assert "pyaxengine (layer0): [INFO] Using provider: AxEngineExecutionProvider" in lines
    assert "pyaxengine (vision): [INFO] Compiler version: 3.4 standin" in lines
    runtime = model.layers[0].runtime.describe()
    assert runtime == {"pyaxengine": "0.1.3", "shape_groups": True, "engine_version": "2.12.0s",
                       "providers": ["AxEngineExecutionProvider"]}


def test_the_daemons_json_log_carries_them(importable_standin, board_dir):
    from daemon.logs import configure_logging, reset_logging

    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    try:
        load_model(board_dir, backend="axengine")
    finally:
        reset_logging()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    found = [r for r in records if "[INFO] Using provider" in r["event"]]
    assert found and found[0]["level"] == "debug" and found[0]["logger"] == "npu.board.pyaxengine"
    assert any(r["event"].startswith("board data path: zero-copy") and r["level"] == "info" for r in records)


def test_vlmd_ask_json_prints_only_the_answer(tmp_path, board_proc_dir):
    if not (DEMO_DIR / "model.safetensors").is_file():
        pytest.skip("demo model not built")
    board = build_board_dir(DEMO_DIR, tmp_path / "demo", "axera")
    env = {k: v for k, v in os.environ.items() if k not in STANDIN_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(STANDIN_ROOT), str(REPO)]), VLMD_AX_PROC=str(board_proc_dir))
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "ask", "--model", str(board), "--max-tokens", "6",
                           "--json", "What is this?"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "[INFO]" not in done.stdout and "[INFO]" not in done.stderr
    final = json.loads(done.stdout.strip().splitlines()[-1])
    assert final["done"] is True and final["usage"]["completion_tokens"] > 0
