"""Board fixtures: the axengine stand-in, compiled-model directories as they ship, real boards.

- `axengine_standin`: makes `import axengine` find tests/axengine_standin/axengine for
  the test (its counters reset), and forgets it afterwards.
- `build_board_dir(checkpoint, out, kind, ...)`: writes an AXERA llm_build-style or an
  M5Stack-style directory whose ".axmodel" files are stand-in JSON naming the checkpoint
  and graph, with the real embedding file (H1's exporter) and tokenizer files.
- `axera_board_dir`, `m5stack_board_dir`: those two, built once per session from the
  tiny native InternVL checkpoint (KV capacity 159, prefill chunk 32, one history group).
- `board_model_dir`: a real board's model directory from $VLMD_BOARD_MODEL_DIR with a
  real axengine; skips (with the reason) anywhere else. Tests using it are marked `board`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

STANDIN_ROOT = Path(__file__).parent / "axengine_standin"
STANDIN_FORMAT = "vlmd-axengine-standin/1"
BOARD_ENV = "VLMD_BOARD_MODEL_DIR"
# Small shapes that still exercise every path: 64 image tokens + text > one 32-row chunk,
# a history group for the second chunk, the rest through decode.
BOARD_BUILD = dict(kv_capacity=159, prefill_chunk=32, history_groups=1)
M5STACK_MODEL = "internvl2-tiny-ax630c"


def _import_standin():
    saved = {name: mod for name, mod in sys.modules.items() if name == "axengine" or name.startswith("axengine.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(STANDIN_ROOT))
    try:
        module = importlib.import_module("axengine")
    finally:
        sys.path.remove(str(STANDIN_ROOT))
    loaded = {name: mod for name, mod in sys.modules.items() if name == "axengine" or name.startswith("axengine.")}
    for name in loaded:
        del sys.modules[name]
    sys.modules.update(saved)
    return module, loaded


@pytest.fixture(scope="session")
def _standin_modules():
    """The stand-in imported once (its reference-graph cache lives for the session), kept out of sys.modules."""
    return _import_standin()


@pytest.fixture
def axengine_standin(_standin_modules, monkeypatch):
    module, modules = _standin_modules
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("VLMD_STANDIN_PROVIDERS", raising=False)
    module.STATS.reset()
    return module


def _n_layers(config: dict) -> int:
    text = config.get("llm_config") or config.get("text_config") or config
    return int(text["num_hidden_layers"])


def _write_graph(path: Path, checkpoint: Path, graph: str, precision: str, build: dict, post_topk: int = 0) -> None:
    spec = {"format": STANDIN_FORMAT, "checkpoint": str(checkpoint), "graph": graph, "precision": precision, **build}
    if post_topk:
        spec["post_topk"] = post_topk
    path.write_text(json.dumps(spec))


def _copy_tokenizer(checkpoint: Path, folder: Path, with_config: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json", "tokenizer.json"):
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, folder / name)
    if with_config:
        shutil.copyfile(checkpoint / "config.json", folder / "config.json")


def _write_graphs(checkpoint: Path, folder: Path, precision: str, build: dict, post_topk: int) -> dict[str, str]:
    from npu.embeddings import export_embeddings

    config = json.loads((checkpoint / "config.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    names = {"layers": f"qwen2_p{build['prefill_chunk']}_l%d_together.axmodel", "post": "qwen2_post.axmodel",
             "vision": "intervl_vision_part_224.axmodel", "embed": "model.embed_tokens.weight.bfloat16.bin"}
    for i in range(_n_layers(config)):
        _write_graph(folder / (names["layers"] % i), checkpoint, f"layer{i}", precision, build)
    _write_graph(folder / names["post"], checkpoint, "post", precision, build, post_topk)
    if "vision_config" in config:  # text-only checkpoints ship no vision graph
        _write_graph(folder / names["vision"], checkpoint, "vision", precision, build)
    export_embeddings(checkpoint, folder / names["embed"])
    return names


def build_board_dir(checkpoint: Path, out: Path, kind: str, precision: str = "bf16", build: dict | None = None,
                    post_topk: int = 0) -> Path:
    """A compiled-model directory of `kind` ("axera" or "m5stack") under `out`; returns the model folder."""
    build = dict(BOARD_BUILD if build is None else build)
    checkpoint = Path(checkpoint).resolve()
    if kind == "axera":  # AXERA's releases: <name>_axmodel/ beside <name>_tokenizer/ (with config.json)
        model_dir = out / "internvl2_tiny_axmodel"
        _write_graphs(checkpoint, model_dir, precision, build, post_topk)
        _copy_tokenizer(checkpoint, out / "internvl2_tiny_tokenizer", with_config=True)
        return model_dir
    if kind != "m5stack":
        raise ValueError(kind)
    # /opt/m5stack/{data/<model>/, data/models/mode_<model>.json, scripts/tokenizer_<model>.py}
    model_dir = out / "data" / M5STACK_MODEL
    names = _write_graphs(checkpoint, model_dir, precision, build, post_topk)
    _copy_tokenizer(checkpoint, model_dir / "internvl2_tokenizer", with_config=False)
    config = json.loads((checkpoint / "config.json").read_text())
    text = config.get("llm_config") or config.get("text_config") or config
    mode = {"mode": M5STACK_MODEL, "type": "vlm", "capabilities": ["text_generation", "chat"], "mode_param": {
        "tokenizer_type": 2, "filename_tokenizer_model": "http://localhost:8080",
        "filename_tokens_embed": names["embed"], "filename_post_axmodel": names["post"],
        "template_filename_axmodel": names["layers"], "filename_vpm_resampler_axmodedl": names["vision"],
        "b_use_topk": bool(post_topk), "b_bos": False, "b_eos": False, "axmodel_num": _n_layers(config),
        "tokens_embed_num": text["vocab_size"], "img_token_id": config.get("image_token_id") or config.get("img_context_token_id") or 151648, "tokens_embed_size": text["hidden_size"],
        "b_use_mmap_load_embed": True, "ext_scripts": [f"tokenizer_{M5STACK_MODEL}.py"]}}
    if not (model_dir / names["vision"]).is_file():
        del mode["mode_param"]["filename_vpm_resampler_axmodedl"]
    (out / "data" / "models").mkdir(parents=True, exist_ok=True)
    (out / "data" / "models" / f"mode_{M5STACK_MODEL}.json").write_text(json.dumps(mode, indent=4))
    (out / "scripts").mkdir(exist_ok=True)
    (out / "scripts" / f"tokenizer_{M5STACK_MODEL}.py").write_text(
        "import argparse\nargs = argparse.ArgumentParser()\n"
        "args.add_argument('--model_id', type=str, default='internvl2_tokenizer')\n"
    )
    return model_dir


@pytest.fixture(scope="session")
def axera_board_dir(tiny_internvl_native, tmp_path_factory) -> Path:
    return build_board_dir(tiny_internvl_native.path, tmp_path_factory.mktemp("axera"), "axera")


@pytest.fixture(scope="session")
def m5stack_board_dir(tiny_internvl_native, tmp_path_factory) -> Path:
    return build_board_dir(tiny_internvl_native.path, tmp_path_factory.mktemp("m5stack"), "m5stack")


@pytest.fixture(scope="session")
def board_model_dir() -> Path:
    """A real board's model directory ($VLMD_BOARD_MODEL_DIR) with the real axengine importable."""
    path = os.environ.get(BOARD_ENV)
    if not path:
        pytest.skip(f"board test: set {BOARD_ENV} to a compiled model directory on an AXERA board")
    try:
        import axengine  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"board test: the real axengine is not importable here ({exc})")
    if "axengine_standin" in str(getattr(sys.modules.get("axengine"), "__file__", "")):
        pytest.skip("board test: axengine resolves to the test stand-in, not the real package")
    return Path(path)
