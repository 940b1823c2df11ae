"""`vlmd model inspect`, `vlmd model export-embeddings`, `vlmd check` and `vlmd bench`, run in-process."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.cli import main
from npu.model import DEMO_MODEL_DIR
from tests.fixtures_board import BOARD_BUILD, M5STACK_MODEL

SMALL = ["--kv-capacity", str(BOARD_BUILD["kv_capacity"]), "--prefill-chunk", str(BOARD_BUILD["prefill_chunk"])]


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


# --- vlmd model inspect -------------------------------------------------------------------------


def test_inspect_explains_an_axera_directory(axengine_standin, axera_board_dir, capsys):
    code, out = run_cli(capsys, "model", "inspect", axera_board_dir)
    assert code == 0, out
    assert "layout    axera" in out
    assert "graph     vision  [intervl_vision_part_224.axmodel]" in out
    assert "graph     layer0  [qwen2_p32_l0_together.axmodel]" in out
    assert "K_cache [1, 159, 32] bfloat16" in out  # decode group, read from the graph
    assert "hidden 64  kv_dim 32  KV capacity 159  prefill chunk 32  history groups 1" in out
    assert "vocab 151655" in out and "image tokens 64  image size 224x224" in out
    assert "template  Hermes-2 (config.json)" in out
    assert "<IMG_CONTEXT>=151648" in out and "<|im_end|>=151645" in out
    assert "problems  none" in out


def test_inspect_explains_an_m5stack_package_as_json(axengine_standin, m5stack_board_dir, capsys):
    code, out = run_cli(capsys, "model", "inspect", "--json", m5stack_board_dir)
    assert code == 0, out
    report = json.loads(out)
    assert report["layout"] == "m5stack"
    assert report["template"] == "Hermes-2" and "assumed from the package name" in report["template_source"]
    assert report["facts"]["n_layers"] == 2 and report["facts"]["image_tokens"] == 64
    assert report["embedding_rows"] == 151655
    assert report["tokenizer"]["image_context_tokens"] == 64
    assert report["tokenizer"]["dir"].endswith("internvl2_tokenizer")
    assert report["problems"] == []


def test_inspect_names_inconsistent_pieces(axengine_standin, m5stack_board_dir, tmp_path, capsys):
    root = tmp_path / "opt"
    shutil.copytree(m5stack_board_dir.parent.parent, root)
    model_dir = root / "data" / M5STACK_MODEL
    embeddings = model_dir / "model.embed_tokens.weight.bfloat16.bin"
    os.truncate(embeddings, 151000 * 64 * 2)  # rows cut off
    mode_file = root / "data" / "models" / f"mode_{M5STACK_MODEL}.json"
    mode = json.loads(mode_file.read_text())
    mode["mode_param"]["img_token_id"] = 151667  # InternVL2.5's id on an InternVL2 tokenizer
    mode_file.write_text(json.dumps(mode))
    (model_dir / "qwen2_p32_l1_together.axmodel").unlink()
    code, out = run_cli(capsys, "model", "inspect", model_dir)
    assert code == 1
    assert "1 of 2 layer graphs missing, e.g. qwen2_p32_l1_together.axmodel" in out
    # With a graph missing the graphs cannot be opened, but every other problem is still listed.
    os.symlink(model_dir / "qwen2_p32_l0_together.axmodel", model_dir / "qwen2_p32_l1_together.axmodel")
    code, out = run_cli(capsys, "model", "inspect", model_dir)
    assert code == 1
    assert "151000 rows x 64 (= 19328000 bytes), post graph vocab is 151655" in out
    assert "declared vocab is 151655" in out
    assert "declares image token id 151667, the tokenizer has 151648" in out


def test_inspect_a_checkpoint_uses_reference_graphs(tiny_internvl_native, capsys):
    code, out = run_cli(capsys, "model", "inspect", tiny_internvl_native.path)
    assert code == 0, out
    assert "layout    hf" in out and "KV capacity 1023  prefill chunk 128" in out


def test_inspect_without_axengine_still_explains_the_layout(axera_board_dir, tmp_path, monkeypatch, capsys):
    shutil.copytree(axera_board_dir.parent, tmp_path / "copy")  # new paths: no session opened for them yet
    monkeypatch.setitem(sys.modules, "axengine", None)  # a development machine: no axengine
    code, out = run_cli(capsys, "model", "inspect", tmp_path / "copy" / axera_board_dir.name)
    assert code == 1
    assert "layout    axera" in out and "file      layers     qwen2_p32_l0_together.axmodel .. " in out
    assert "file      tokenizer  ../internvl2_tiny_tokenizer" not in out  # outside the folder: absolute
    assert "graphs not opened: " in out and ": board: axengine is not importable" in out  # the part named


def test_inspect_unknown_directory(tmp_path, capsys):
    code, out = run_cli(capsys, "model", "inspect", tmp_path)
    assert code == 2 and "not a model directory vlmd recognises" in out


def test_export_embeddings(tiny_internvl_original, tmp_path, capsys):
    out_file = tmp_path / "model.embed_tokens.weight.bfloat16.bin"
    code, out = run_cli(capsys, "model", "export-embeddings", tiny_internvl_original.path, out_file)
    assert code == 0, out
    assert out_file.stat().st_size == 151655 * 64 * 2
    weights = tiny_internvl_original.torch_model.get_input_embeddings().weight.detach().numpy()
    import ml_dtypes

    rows = np.fromfile(out_file, dtype=ml_dtypes.bfloat16).reshape(151655, 64)
    np.testing.assert_array_equal(rows[[0, 151648]].astype(np.float32), weights[[0, 151648]])


# --- vlmd check -----------------------------------------------------------------------------------


def test_check_board_directory_against_its_checkpoint(axengine_standin, axera_board_dir, tiny_internvl_native, capsys):
    code, out = run_cli(capsys, "check", "--model", axera_board_dir, "--reference", tiny_internvl_native.path,
                        "--precision", "bf16", "--max-tokens", "4", "--json")
    assert code == 0, out
    report = json.loads(out)
    graphs = {row["graph"]: row for row in report["graphs"]}
    assert {"embeddings", "vision", "layer0 output", "layer1 K", "layer1 V"} <= graphs.keys()
    # The stand-in runs the same bf16 graphs: identical to the reference everywhere.
    assert all(row["max_abs"] == 0.0 for row in report["graphs"])
    assert report["top1_agreement"] == 1.0 and report["answers"]["identical"]
    assert report["verdict"] == "faithful"


def test_check_catches_a_model_built_from_other_weights(axengine_standin, tiny_qwen2, tiny_internvl_native,
                                                       tmp_path, capsys):
    from tests.fixtures_board import build_board_dir

    wrong = build_board_dir(tiny_qwen2.path, tmp_path, "axera")  # same shapes, different weights, no vision
    code, out = run_cli(capsys, "check", "--model", wrong, "--reference", tiny_internvl_native.path,
                        "--precision", "bf16", "--max-tokens", "3")
    assert code == 1, out
    assert "verdict: NOT faithful" in out
    layer0 = next(line for line in out.splitlines() if line.startswith("layer0 output"))
    assert float(layer0.split()[2]) < 0.9  # its cosine


def test_check_bf16_model_against_fp32_reference_prints_report(tiny_internvl_native, capsys):
    code, out = run_cli(capsys, "check", "--model", tiny_internvl_native.path, "--reference", tiny_internvl_native.path,
                        "--max-tokens", "3", "--min-top1", "0", *SMALL)
    assert code == 0, out
    assert "layer1 output" in out and "logits (last)" in out
    assert "next token over 32 prompt positions" in out  # the first prefill chunk
    assert "top-1 agreement" in out and "answer (reference) :" in out and "verdict: faithful" in out
    vision = next(line for line in out.splitlines() if line.startswith("vision"))
    cosine = float(vision.split()[1])
    assert 0.98 < cosine < 1.0  # bf16 boundaries against float32: close, not equal


# --- vlmd bench -----------------------------------------------------------------------------------


def test_bench_on_the_reference_backend(tiny_internvl_native, capsys):
    code, out = run_cli(capsys, "bench", "--model", tiny_internvl_native.path, "--runs", "1", "--max-tokens", "4",
                        *SMALL)
    assert code == 0, out
    for label in ("image encode ms", "TTFT ms", "prefill tok/s", "decode tok/s", "host overhead ms/token",
                  "bytes moved/token", "peak RSS MB"):
        assert label in out
    result = json.loads(out.strip().splitlines()[-1])
    bench = result["bench"]
    assert result["backend"] == "reference" and result["runs"] == 1
    assert bench["completion_tokens"] == 4 and bench["decode_tok_s"] > 0 and bench["image_ms"] > 0
    assert bench["host_overhead_ms_per_token"] >= 0 and result["peak_rss_mb"] > 0


def _nbytes(spec) -> int:
    return int(np.prod(spec.shape)) * spec.dtype.itemsize


def _buffers(session) -> tuple[int, int]:
    """pyaxengine's input and output buffer bytes of a session: per tensor index, the largest group's."""
    groups = range(session.num_groups)
    inputs = sum(max(_nbytes(session.inputs(g)[i]) for g in groups) for i in range(len(session.inputs(0))))
    outputs = sum(max(_nbytes(session.outputs(g)[i]) for g in groups) for i in range(len(session.outputs(0))))
    return inputs, outputs


def test_bench_counts_every_byte_the_public_path_moves(axengine_standin, axera_board_dir, capsys):
    from npu.model import load_model

    code, out = run_cli(capsys, "bench", "--model", axera_board_dir, "--runs", "1", "--max-tokens", "3", "--json",
                        "--data-path", "public")
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["data_path"] == {"data_path": "public", "reason": "model.data_path = public"}
    model = load_model(axera_board_dir, backend="axengine", data_path="public")
    decode_inputs = sum(_nbytes(s) for s in model.layers[0].inputs(0))
    token_row = _nbytes(model.post.inputs(0)[0])  # the post graph's input row
    bench = result["bench"]
    # pyaxengine's run() memmoves every fed input (every layer's full K/V cache, mask, input, position,
    # and the post input), flushes every whole input buffer and invalidates every whole output buffer.
    assert bench["bytes_per_token"] == bench["fed_bytes_per_token"] == len(model.layers) * decode_inputs + token_row
    layer_in, layer_out = _buffers(model.layers[0])
    post_in, post_out = _buffers(model.post)
    assert bench["device_flushed_per_token"] == len(model.layers) * layer_in + post_in
    assert bench["device_invalidated_per_token"] == len(model.layers) * layer_out + post_out
    assert axengine_standin.STATS.bytes_flushed > 0  # the stand-in saw those calls too
    # Host copies: at least the next token's embedding row (the engine also counts its K/V row writes).
    assert bench["host_copy_bytes_per_token"] >= token_row
    assert result["written_vs_cpp"] > 10  # the whole cache per layer per token


def test_bench_on_the_zero_copy_path_writes_rows_not_caches(axengine_standin, axera_board_dir, capsys):
    code, out = run_cli(capsys, "bench", "--model", axera_board_dir, "--runs", "1", "--max-tokens", "3", "--json")
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["data_path"]["data_path"] == "zero-copy"
    bench, n_layers, hidden_row, kv_row, vocab = result["bench"], 2, 64 * 2, 32 * 2, 151655
    # Per token: layer 0's input row, the position (4 B), one mask slot (2 B), each layer's new K and
    # V row, the post input row; each flushed by whole 64-byte lines; invalidated: the K/V rows read,
    # the last layer's output row and the logits.
    assert bench["bytes_per_token"] == hidden_row + 4 + 2 + n_layers * 2 * kv_row + hidden_row
    assert bench["device_flushed_per_token"] == hidden_row + 64 + 64 + n_layers * 2 * kv_row + hidden_row
    assert bench["device_invalidated_per_token"] == n_layers * 2 * kv_row + hidden_row + vocab * 2
    assert result["cpp_runtime"]["stackflow"]["written"] == n_layers * (4 + 160 * 2 + hidden_row + 2 * kv_row) + hidden_row
    assert result["written_vs_cpp"] <= 2
    assert "data path                  zero-copy" not in out  # --json: only the JSON line


def test_bench_on_an_m5stack_internvl2_5_package_meets_the_cpp_runtimes_bytes(axengine_standin, tmp_path, capsys):
    """Issue 13's "done when": bytes per token <= 2x the C++ runtime's, greedy tokens = public path = reference."""
    from tests.fixtures_board import build_board_dir
    from tests.test_demo_board import DEMO_DIR

    if not (DEMO_DIR / "model.safetensors").is_file():
        pytest.skip("demo model not built")
    checkpoint = tmp_path / "checkpoint"  # the demo model, declared with InternVL2.5's template
    shutil.copytree(DEMO_DIR, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(dict(config, template="internvl2_5")))
    build = dict(BOARD_BUILD, kv_capacity=255)  # room for internvl2_5's system prompt, the image and the answer
    package = build_board_dir(checkpoint, tmp_path / "opt", "m5stack", build=build, model_name="internvl2.5-1B-ax630c")
    common = ["--runs", "1", "--max-tokens", "10", "--prompt", "Describe the image shortly.", "--json"]
    results = {}
    for name, argv in (("zero-copy", ["--model", package]), ("public", ["--model", package, "--data-path", "public"]),
                       ("reference", ["--model", checkpoint, "--backend", "reference", "--kv-capacity", "255",
                                      "--prefill-chunk", str(build["prefill_chunk"]), "--history-groups",
                                      str(build["history_groups"])])):
        code, out = run_cli(capsys, "bench", *argv, *common)
        assert code == 0, out
        results[name] = json.loads(out.strip().splitlines()[-1])
    zero_copy = results["zero-copy"]
    assert zero_copy["data_path"]["data_path"] == "zero-copy"
    cpp = zero_copy["cpp_runtime"]["stackflow"]["written"]
    assert zero_copy["bench"]["bytes_per_token"] <= 2 * cpp and zero_copy["written_vs_cpp"] <= 2
    assert results["public"]["bench"]["bytes_per_token"] > 2 * cpp
    tokens = zero_copy["bench"]["tokens"]
    assert len(tokens) == 10 and len(set(tokens)) > 3
    assert tokens == results["public"]["bench"]["tokens"] == results["reference"]["bench"]["tokens"]


def test_bench_refuses_bad_arguments(capsys):
    code, out = run_cli(capsys, "bench", "--runs", "0")
    assert code == 2 and "--runs" in out


def test_inspect_reports_template_tokenizer_and_embeddings_for_every_layout(
        axengine_standin, axera_board_dir, m5stack_board_dir, tiny_internvl_native, capsys):
    from npu.model import DEMO_MODEL_DIR

    for path in (axera_board_dir, m5stack_board_dir, tiny_internvl_native.path, DEMO_MODEL_DIR):
        code, out = run_cli(capsys, "model", "inspect", "--json", path)
        assert code == 0, out
        report = json.loads(out)
        assert report["template"] == "Hermes-2", (path, report["template"])
        assert Path(report["tokenizer"]["dir"]).is_dir() and report["tokenizer"]["special_ids"]["<IMG_CONTEXT>"] is not None
        embeddings = report["embeddings"]
        assert embeddings["file"] and embeddings["rows"] == report["facts"]["vocab"] and embeddings["hidden"] > 0
        assert report["demo_model"] == (path == DEMO_MODEL_DIR)


def test_inspect_without_a_directory_explains_the_demo_model(capsys):
    code, out = run_cli(capsys, "model", "inspect")
    assert code == 0, out
    assert out.startswith("model     ") and "(the demo model shipped with vlmd)" in out.splitlines()[0]
    assert "template  Hermes-2 (config.json)" in out
    assert "tokenizer " + str((Path(__file__).parents[1] / "npu" / "assets" / "demo_model").resolve()) in out
    assert "embeddings " in out and "exported from the checkpoint's weights" in out
    assert "file      embeddings None" not in out


def test_inspect_names_the_tokenizer_of_a_checkpoint_in_words(capsys):
    """#21.14: the demo checkpoint keeps its tokenizer in the model directory itself; the
    report said `file tokenizer  .`."""
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        pytest.skip(f"the demo model is not built ({DEMO_MODEL_DIR})")
    code, out = run_cli(capsys, "model", "inspect", str(DEMO_MODEL_DIR))
    assert code == 0
    (line,) = [row for row in out.splitlines() if row.startswith("file") and "tokenizer" in row]
    assert line.split(None, 2)[2] == "(the model directory)"
