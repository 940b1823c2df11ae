"""M5Stack's SmolVLM packages as they ship, at tiny dims, for the axengine stand-in.

Mode files: m5stack/StackFlow at d9084bad88331b1913899f624a98cbb93cfdc148,
projects/llm_framework/main_vlm/models/mode_smolvlm-256M-ax630c.json, mode_smolvlm-256M-ax650.json,
mode_smolvlm-500M-ax630c.json and mode_smolvlm-500M-ax650.json: every key and value as there
(`compile_flage` and `pulsar_version` included, and the 500M-ax650 file's `"mode":
"smolvlm-500M-ax630c"`), only `tokens_embed_size` and `axmodel_num` made tiny. Layout as
tools/llm_pack.py (same commit) installs a package: `/opt/m5stack/data/<model>/` with the graphs,
the embeddings and `tokenizer/` (main.cpp passes `--model_id <model dir>/tokenizer`), the mode file
in `data/models/`, the tokenizer script in `scripts/`. llm_pack.py builds debs for the first three
only; the 500M-ax650 mode file ships with no package.

Graphs: stand-in specs (`"family": "smolvlm"`) of the tiny SmolVLM checkpoint
(tests/smolvlm_factory.py) with the build no public source states for these packages: a 1023-row
cache (llm_build's --kv_cache_len in AXERA's SmolVLM build, nnn112358/SmolVLM-256M-Instruct.axera 4b0bfff
build_LM.sh), 128-row chunks (`p128` in the file names), no history groups.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tests.fixtures_board import STANDIN_FORMAT

KV_CAPACITY, PREFILL_CHUNK = 1023, 128
_IO = {"input_type": ["vlm.chat_completion", "vlm.chat_completion.stream"],
       "output_type": ["vlm.utf-8", "vlm.utf-8.stream"]}
_COMPILE_500M = ("pulsar2 build --input HuggingFaceTB/SmolVLM-500M-w8a16/SmolVLM-500M-Instruct_vision.onnx --config "
                 "AXERA/SmolVLM-256M-Instruct.axera/model_convert/config.json --output_dir "
                 "HuggingFaceTB/SmolVLM-500M-w8a16/build-output --output_name SmolVLM-500M-Instruct_vision.axmodel "
                 "--target_hardware AX620E --compiler.check 0 --npu_mode NPU2")


def _params(vision: str, layers: int, hidden: int, script: str) -> dict:
    return {"tokenizer_type": 2, "filename_tokenizer_model": "http://localhost:8080",
            "filename_tokens_embed": "model.embed_tokens.weight.bfloat16.bin",
            "filename_post_axmodel": "llama_post.axmodel", "template_filename_axmodel": "llama_p128_l%d_together.axmodel",
            "filename_vpm_resampler_axmodedl": vision, "b_use_topk": False, "b_bos": False, "b_eos": False,
            "axmodel_num": layers, "tokens_embed_num": 49280, "img_token_id": 49190, "tokens_embed_size": hidden,
            "b_use_mmap_load_embed": True, "b_dynamic_load_axmodel_layer": False, "ext_scripts": [script]}


def _mode(mode: str, homepage: str, params: dict, compile_flag: str | None = None) -> dict:
    head = {"mode": mode, "type": "vlm", "homepage": homepage}
    if compile_flag:
        head.update({"compile_flage": compile_flag, "pulsar_version": "3.4-983bb35e"})
    return {**head, "capabilities": ["text_generation", "chat"], **_IO, "mode_param": params}


REAL_MODE_FILES = {
    "smolvlm-256M-ax630c": _mode("smolvlm-256M-ax630c", "https://huggingface.co/HuggingFaceTB/SmolVLM-256M-Instruct",
                                 _params("SmolVLM-256M-Instruct_vision_nhwc.axmodel", 30, 576,
                                         "tokenizer_smolvlm-256M-ax630c.py")),
    "smolvlm-256M-ax650": _mode("smolvlm-256M-ax650", "https://huggingface.co/AXERA-TECH/SmolVLM-256M-Instruct",
                                _params("SmolVLM-256M-Instruct_vision_nhwc.axmodel", 30, 576,
                                        "tokenizer_smolvlm-256M-ax650.py")),
    "smolvlm-500M-ax630c": _mode("smolvlm-500M-ax630c", "https://huggingface.co/HuggingFaceTB/SmolVLM-500M-Instruct",
                                 _params("SmolVLM-500M-Instruct_vision.axmodel", 32, 960,
                                         "tokenizer_smolvlm-500M-ax630c.py"), _COMPILE_500M),
    # as published: the file's "mode" names the AX630C package, its script too
    "smolvlm-500M-ax650": _mode("smolvlm-500M-ax630c", "https://huggingface.co/HuggingFaceTB/SmolVLM-500M-Instruct",
                                _params("SmolVLM-500M-Instruct_vision.axmodel", 32, 960,
                                        "tokenizer_smolvlm-500M-ax630c.py"), _COMPILE_500M),
}
SHIPPED = ("smolvlm-256M-ax630c", "smolvlm-256M-ax650", "smolvlm-500M-ax630c")


def tiny_mode_file(name: str, hidden: int, layers: int) -> dict:
    mode = json.loads(json.dumps(REAL_MODE_FILES[name]))
    mode["mode_param"].update(tokens_embed_size=hidden, axmodel_num=layers)
    return mode


def _graph(path: Path, checkpoint: Path, graph: str) -> None:
    spec = {"format": STANDIN_FORMAT, "family": "smolvlm", "checkpoint": str(checkpoint), "graph": graph,
            "precision": "bf16", "kv_capacity": KV_CAPACITY, "prefill_chunk": PREFILL_CHUNK, "history_lengths": [],
            "placeholder": "hidden"}
    path.write_text(json.dumps(spec))


def build_m5stack_smolvlm(name: str, checkpoint: Path, prefix: Path, hidden: int, layers: int,
                          folder: str | None = None) -> Path:
    """/opt/m5stack as the package's deb lays it out (the mode file under its own name); returns
    data/<folder or name>/."""
    from npu.reference.idefics3 import load_idefics3_checkpoint

    mode = tiny_mode_file(name, hidden, layers)
    params = mode["mode_param"]
    model_dir = prefix / "data" / (folder or name)
    model_dir.mkdir(parents=True, exist_ok=True)
    for i in range(layers):
        _graph(model_dir / (params["template_filename_axmodel"] % i), checkpoint, f"layer{i}")
    _graph(model_dir / params["filename_post_axmodel"], checkpoint, "post")
    _graph(model_dir / params["filename_vpm_resampler_axmodedl"], checkpoint, "vision")
    embed = np.asarray(load_idefics3_checkpoint(checkpoint)[1]["embed"])
    embed.astype(ml_dtypes.bfloat16).tofile(model_dir / params["filename_tokens_embed"])  # raw bf16, no header
    tokenizer = model_dir / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        (tokenizer / file).write_bytes((checkpoint / file).read_bytes())
    (prefix / "data" / "models").mkdir(parents=True, exist_ok=True)
    (prefix / "data" / "models" / f"mode_{name}.json").write_text(json.dumps(mode, indent=4))
    (prefix / "scripts").mkdir(exist_ok=True)
    (prefix / "scripts" / params["ext_scripts"][0]).write_text(
        "import argparse\nparser = argparse.ArgumentParser()\n"
        "parser.add_argument('--model_id', type=str, default='internvl2_tokenizer')\n")  # as the real scripts say
    return model_dir


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory):
    from tests.fixtures_models import model_factory

    model_factory()  # skips without the dev extra
    from tests import smolvlm_factory

    return smolvlm_factory.build_smolvlm(tmp_path_factory.mktemp("tiny_smolvlm"))


@pytest.fixture(scope="session")
def smolvlm_package(tiny_smolvlm, tmp_path_factory):
    """`get(name, folder=None) -> model folder` of an M5Stack SmolVLM package, built once each."""
    made: dict[tuple, Path] = {}
    text = tiny_smolvlm.config["text_config"]

    def get(name: str, folder: str | None = None) -> Path:
        key = (name, folder)
        if key not in made:
            prefix = tmp_path_factory.mktemp(name.replace(".", "_")) / "opt" / "m5stack"
            made[key] = build_m5stack_smolvlm(name, tiny_smolvlm.path, prefix, text["hidden_size"],
                                              text["num_hidden_layers"], folder)
        return made[key]

    return get
