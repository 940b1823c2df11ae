"""`vlmd ask` end to end on a tiny checkpoint: streamed text, the --json final line, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from daemon.cli import main
from tests import model_dims


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "frame.png"
    Image.fromarray(model_dims.random_image(seed=1, height=120, width=160)).save(path)
    return path


@pytest.fixture(autouse=True)
def embeddings_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLMD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "vlmd-cache"))


def ask(capsys, *argv):
    code = main(["ask", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ask_streams_the_answer_and_ends_with_the_final_json(capsys, tiny_internvl_native, image_file):
    code, out, err = ask(capsys, "--model", str(tiny_internvl_native.path), "--image", str(image_file),
                         "--max-tokens", "6", "--precision", "fp32", "--json", "What is this?")
    assert code == 0, err
    streamed, final_line = out.rsplit("\n", 2)[0], out.rstrip("\n").rsplit("\n", 1)[1]
    final = json.loads(final_line)
    assert final["done"] is True and final["finish_reason"] in ("stop", "length")
    assert streamed == final["text"]
    assert final["usage"]["prompt_tokens"] > model_dims.N_IMAGE_TOKENS
    assert 0 < final["usage"]["completion_tokens"] <= 6 or final["finish_reason"] == "stop"
    assert final["timings"]["images_encoded"] == 1 and final["timings"]["ttft_ms"] > 0


def test_ask_without_image_and_seeded_sampling_repeats(capsys, tiny_qwen2):
    argv = ["--model", str(tiny_qwen2.path), "--max-tokens", "5", "--temperature", "0.9", "--top-p", "0.9",
            "--top-k", "20", "--repetition-penalty", "1.1", "--seed", "4", "--json", "Hello?"]
    first = ask(capsys, *argv)
    second = ask(capsys, *argv)
    finals = [json.loads(run[1].splitlines()[-1]) for run in (first, second)]
    assert first[0] == 0 and finals[0]["text"] == finals[1]["text"]
    assert finals[0]["timings"]["images_encoded"] == 0


def test_too_long_prompt_is_rejected_with_a_json_error(capsys, tiny_qwen2):
    code, out, err = ask(capsys, "--model", str(tiny_qwen2.path), "--kv-capacity", "48", "--prefill-chunk", "16",
                         "--json", "word " * 80)
    assert code == 1 and "KV cache holds 48" in err
    final = json.loads(out.splitlines()[-1])
    assert final["finish_reason"] == "rejected" and final["error"]["code"] == "too_long"


def test_bad_inputs_give_clear_errors(capsys, tmp_path, tiny_qwen2, image_file):
    code, _, err = ask(capsys, "--model", str(tmp_path / "nowhere"), "hi")
    assert code == 2 and "no such model directory" in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out, err = ask(capsys, "--model", str(tiny_qwen2.path), "--image", str(broken), "--json", "hi")
    assert code == 2 and json.loads(out.splitlines()[-1])["error"]["code"] == "bad_image"
    code, _, err = ask(capsys, "--model", str(tiny_qwen2.path), "--image", str(image_file), "hi")
    assert code == 1 and "no vision graph" in err
    code, _, err = ask(capsys, "--model", str(tiny_qwen2.path), "--temperature", "-1", "hi")
    assert code == 2 and "temperature" in err


def test_missing_demo_model_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("npu.model.DEMO_MODEL_DIR", tmp_path / "not-installed")
    code, _, err = ask(capsys, "hi")
    assert code == 2 and "demo model" in err and "--model" in err


def test_console_script_runs(tiny_qwen2, tmp_path):
    env = dict(os.environ, VLMD_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "ask", "--model", str(tiny_qwen2.path),
                             "--max-tokens", "3", "--json", "Hi"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["usage"]["completion_tokens"] >= 0


@pytest.mark.parametrize(("flags", "fields"), [
    (["--temperature", "1000"], {"temperature": 1000.0}),
    (["--temperature", "1e-9"], {"temperature": 1e-9}),
    (["--max-tokens", "5000"], {"max_tokens": 5000}),
    (["--max-tokens", "0"], {"max_tokens": 0}),
    (["--top-p", "0"], {"top_p": 0.0}),
    (["--top-k", "-1"], {"top_k": -1}),
    (["--repetition-penalty", "1000"], {"repetition_penalty": 1000.0}),
    (["--seed", "-3"], {"seed": -3}),
    (["--system", "  "], {"system": "  "}),
    (["--temperature", "nan"], {"temperature": float("nan")}),
])
def test_options_are_refused_by_the_mqtt_rules_with_the_same_message(capsys, tmp_path, flags, fields):
    """`vlmd ask` refuses exactly what the daemon refuses on <root>/ask, in the same words,
    before it loads any model (the model path does not even exist here)."""
    from daemon.config import RequestsConfig
    from protocol.codec import ProtocolError, decode_ask
    from protocol.payloads import AskLimits

    defaults = RequestsConfig()
    limits = AskLimits(max_text_chars=defaults.max_text_chars, max_tokens=defaults.max_tokens_limit)
    wire = json.dumps({"id": "q", "text": "hi", **fields}).replace("NaN", "1e999").encode()
    with pytest.raises(ProtocolError) as refused:  # what the daemon's MQTT path does with it
        decode_ask(wire, defaults.max_payload_bytes, limits)
    code, out, err = ask(capsys, "--model", str(tmp_path / "no-model"), *flags, "--json", "hi")
    assert code == 2
    assert err == f"vlmd ask: {refused.value.message}\n"
    final = json.loads(out.splitlines()[-1])
    assert final["finish_reason"] == "rejected"
    assert final["error"] == {"code": refused.value.code, "message": refused.value.message}


def test_question_longer_than_the_daemons_limit_is_refused(capsys, tmp_path):
    code, _, err = ask(capsys, "--model", str(tmp_path / "no-model"), "x" * 4001)
    assert code == 2 and err == "vlmd ask: text: longer than 4000 characters (4001)\n"


def test_ask_with_a_format_ends_with_value_and_confidence(capsys, tiny_qwen2):
    code, out, err = ask(capsys, "--model", str(tiny_qwen2.path), "--format",
                         '{"type": "integer", "minimum": 0, "maximum": 20}', "--json", "How many?")
    assert code == 0, err
    final = json.loads(out.splitlines()[-1])
    assert final["finish_reason"] == "stop" and json.loads(final["text"]) == final["value"]
    assert type(final["value"]) is int and 0 <= final["value"] <= 20 and 0 <= final["confidence"] <= 1
    code, out, err = ask(capsys, "--model", str(tiny_qwen2.path), "--format", '{"not": {"type": "string"}}',
                         "--json", "Yes?")  # a JSON Schema keyword the engine cannot compile: the engine refuses
    assert code == 1 and 'vlmd ask: format: Unimplemented keys: ["not"]' in err, err
    assert json.loads(out.splitlines()[-1])["error"]["code"] == "bad_request"
    code, _, err = ask(capsys, "--model", str(tiny_qwen2.path), "--format", "{boolean}", "Yes?")
    assert code == 2 and "format: --format is not JSON" in err


def test_ask_takes_the_board_data_path_like_bench(capsys, monkeypatch, board_axengine, tiny_internvl_native,
                                                  tmp_path, image_file):
    import npu.model
    from tests.fixtures_board import build_board_dir

    board = build_board_dir(tiny_internvl_native.path, tmp_path / "board", "axera")
    loaded, original = [], npu.model.load_model

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded.append(model.data_path.name)
        return model

    monkeypatch.setattr(npu.model, "load_model", spy)
    answers = []
    for path in ("public", "zero-copy", "auto"):
        code, out, err = ask(capsys, "--model", str(board), "--image", str(image_file), "--max-tokens", "6",
                             "--data-path", path, "--json", "What is in the picture?")
        assert code == 0, err
        answers.append(json.loads(out.splitlines()[-1])["text"])
    assert loaded == ["public", "zero-copy", "zero-copy"]
    assert answers[0] == answers[1] == answers[2] and answers[0]
    with pytest.raises(SystemExit) as refused:
        ask(capsys, "--model", str(board), "--data-path", "host", "Hi")
    assert refused.value.code == 2 and "invalid choice: 'host'" in capsys.readouterr().err
