"""Model packages as M5Stack and AXERA publish them, at tiny dims, run by the axengine stand-in.

Each package keeps its real file and folder names and, for M5Stack, its real mode-file
contents (keys, values, sampling fields, precompute_len, cmm_size, img_token_id,
tokens_embed_num), with only the dimensions made tiny (`tokens_embed_size` 64,
`axmodel_num` 2): the .axmodel files are stand-in JSON specs of reference graphs
(tests/axengine_standin) built from tiny checkpoints of the package's family and image
size (tests/model_factory.py), with the build each package's graphs declare (prefill chunk,
KV capacity, history lengths, vision input convention and output dtype).

Sources read:
- m5stack/StackFlow at d9084bad88331b1913899f624a98cbb93cfdc148:
  projects/llm_framework/main_vlm/models/mode_internvl2-1B-ax630c.json,
  mode_internvl2.5-1B-ax630c.json, mode_internvl2.5-1B-364-ax630c.json,
  mode_internvl3-1B-448-ax630c.json, mode_internvl3-1B-448-ax650.json (the mode files),
  scripts/tokenizer_<model>.py (their `--model_id` defaults), src/main.cpp (StackFlow
  passes `<model>/tokenizer`), tools/llm_pack.py (data/<model>/, data/models/, scripts/);
- AXERA-TECH Hugging Face repositories as their model cards and M5Stack's LLM-8850 guide
  list them: InternVL2_5-1B for AX630C (config.json, internvl2_5_1b_364_ax630c/,
  internvl2_5_tokenizer/, internvl2_5_tokenizer_364.py, main,
  run_internvl2_5_364_ax630c.sh) and InternVL3-1B (config.json, internvl3_1b_ax650/ with
  qwen2_p128_l%d_together.axmodel and internvl3_1b_vit.axmodel, internvl3_tokenizer/,
  post_config.json, the main_*/run_* files); 0-byte config.json as InternVL3-2B and
  InternVL3_5-2B ship it;
- AXERA-TECH/InternVL3-2B.axera at 55533b5db7430d6515811bdbd9db84c6f2355356 python/infer.py:
  `pulsar2 llm_build --prefill_len 128 --last_kv_cache_len 128 ... 1024, 1536, 2048
  --kv_cache_len 2559`, group 1's K/V placeholders np.zeros((1, 1, hidden)), the vision
  graph fed {"image": float32 NCHW}, `model.embed_tokens.weight.npy`;
- AXERA-TECH/ax-llm at c26dcbb2bb0c9e10ce7d77a63d9bf64b9aa46981 src/post_config.json.

Qwen3-VL (m5stack/StackFlow d9084ba models/mode_qwen3-vl-2B-Int4-ax630c.json and -ax650.json,
their scripts/tokenizer_qwen3-vl-2B-Int4-*.py, `--model_id` default 'tokenizer'): the mode files
as shipped with the dimensions made tiny (tokens_embed_size 64, axmodel_num 3, vision 96 px:
tests/model_factory_qwen3vl.py); graphs built from a tiny Qwen3-VL checkpoint. Their builds
are not published: AX630C p64 with 64-step histories to 512 in a 1023-row cache (assumed),
AX650 as AXERA's model_convert/build_llm.sh builds it (AXERA-TECH/Qwen3-VL.AXERA 2e8db66:
--prefill_len 128, --last_kv_cache_len 128 .. 1152, --kv_cache_len 2047).

What no public source states (the graphs' KV capacity and history lengths inside M5Stack's
packages) is chosen to cover both kinds of build: 128-step histories on
internvl3-1B-448-ax630c, 512-step ones on internvl3-1B-448-ax650.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import model_factory
from tests.fixtures_board import STANDIN_FORMAT

TINY = dict(tokens_embed_size=model_factory.TEXT_DIMS["hidden_size"],
            axmodel_num=model_factory.TEXT_DIMS["num_hidden_layers"])
# ax-llm's post_config.json (AXERA's repositories ship it beside their runtimes)
AX_LLM_POST_CONFIG = {"enable_temperature": True, "temperature": 0.9, "enable_repetition_penalty": False,
                      "repetition_penalty": 1.2, "penalty_window": 20, "enable_top_p_sampling": False, "top_p": 0.8,
                      "enable_top_k_sampling": True, "top_k": 10}
_IO_TYPES = {"input_type": ["vlm.chat_completion", "vlm.chat_completion.stream"],
             "output_type": ["vlm.utf-8", "vlm.utf-8.stream"]}


def _mode(model: str, params: dict, homepage: str | None = None) -> dict:
    mode = {"mode": model, "type": "vlm"}
    if homepage:
        mode["homepage"] = homepage
    return {**mode, "capabilities": ["text_generation", "chat"], **_IO_TYPES,
            "mode_param": {**params, **{k: v for k, v in TINY.items() if k in params}}}


_OLD_RUNNER = {"tokenizer_type": 2, "filename_tokenizer_model": "http://localhost:8080",
               "filename_tokens_embed": "model.embed_tokens.weight.bfloat16.bin",
               "filename_post_axmodel": "qwen2_post.axmodel"}
_CTX_SAMPLING = {"enable_temperature": True, "temperature": 0.7, "enable_top_p_sampling": False, "top_p": 0.9,
                 "enable_top_k_sampling": True, "top_k": 40, "enable_repetition_penalty": False,
                 "repetition_penalty": 1.1, "penalty_window": 50}
MODE_FILES = {
    "internvl2-1B-ax630c": _mode("internvl2-1B-ax630c", {
        **_OLD_RUNNER, "template_filename_axmodel": "qwen2_p128_l%d_together.axmodel",
        "filename_vpm_resampler_axmodedl": "intervl_vision_part_20e.axmodel", "b_use_topk": False, "b_bos": False,
        "b_eos": False, "axmodel_num": 24, "tokens_embed_num": 151655, "tokens_embed_size": 896,
        "b_use_mmap_load_embed": True, "b_dynamic_load_axmodel_layer": False,
        "ext_scripts": ["tokenizer_internvl2-1B-ax630c.py"]}),
    "internvl2.5-1B-ax630c": _mode("internvl2.5-1B-ax630c", {
        **_OLD_RUNNER, "template_filename_axmodel": "qwen2_p256_l%d_together.axmodel",
        "filename_vpm_resampler_axmodedl": "intervl_vision_part_224.axmodel", "b_use_topk": False, "b_bos": False,
        "b_eos": False, "axmodel_num": 24, "tokens_embed_num": 151674, "tokens_embed_size": 896,
        "b_use_mmap_load_embed": True, "b_dynamic_load_axmodel_layer": False,
        "ext_scripts": ["tokenizer_internvl2.5-1B-ax630c.py"]}, "https://huggingface.co/OpenGVLab/InternVL2_5-1B-MPO"),
    "internvl2.5-1B-364-ax630c": _mode("internvl2.5-1B-364-ax630c", {
        **_OLD_RUNNER, "template_filename_axmodel": "qwen2_p256_l%d_together.axmodel",
        "filename_vpm_resampler_axmodedl": "vit_intern_sim_space2depth.axmodel", "b_use_topk": False, "b_bos": False,
        "b_eos": False, "axmodel_num": 24, "tokens_embed_num": 151674, "img_token_id": 151667,
        "tokens_embed_size": 896, "b_use_mmap_load_embed": True, "b_dynamic_load_axmodel_layer": False,
        "ext_scripts": ["tokenizer_internvl2.5-1B-364-ax630c.py"]}, "https://huggingface.co/AXERA-TECH/InternVL2_5-1B"),
    **{model: _mode(model, {
        "tokenizer_type": 2, "url_tokenizer_model": "http://localhost:8080",
        "filename_tokens_embed": "model.embed_tokens.weight.bfloat16.bin", "filename_post_axmodel": "qwen2_post.axmodel",
        "template_filename_axmodel": "qwen2_p128_l%d_together.axmodel",
        "filename_image_encoder_axmodel": "internvl3_1b_vit.axmodel", **_CTX_SAMPLING, "axmodel_num": 24,
        "tokens_embed_num": 151674, "img_token_id": 151667, "tokens_embed_size": 896, "b_use_mmap_load_embed": True,
        "precompute_len": precompute, "cmm_size": cmm, "ext_scripts": [f"tokenizer_{model}.py"]},
        "https://huggingface.co/AXERA-TECH/InternVL3-1B")
       for model, precompute, cmm in (("internvl3-1B-448-ax630c", 1024, 1674992),
                                      ("internvl3-1B-448-ax650", 2048, 1919044))},
}
_QWEN3_VL_PARAMS = {
    "tokenizer_type": 2, "url_tokenizer_model": "http://localhost:8080",
    "filename_tokens_embed": "model.embed_tokens.weight.bfloat16.bin", "filename_post_axmodel": "qwen3_vl_text_post.axmodel",
    **_CTX_SAMPLING, "axmodel_num": 3, "tokens_embed_num": 151936, "tokens_embed_size": 64, "b_use_mmap_load_embed": True,
    "b_video": False, "vision_config.temporal_patch_size": 2, "vision_config.tokens_per_second": 2,
    "vision_config.spatial_merge_size": 2, "vision_config.patch_size": 16, "vision_config.height": 96,
    "vision_config.width": 96, "vision_config.fps": 1, "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "precompute_len": 0}
QWEN3_VL_MODE_FILES = {
    model: {"mode": model, "type": "vlm", "homepage": "https://huggingface.co/AXERA-TECH/Qwen3-VL-2B-Instruct",
            "capabilities": ["text_generation", "chat"], **_IO_TYPES, "mode_param": {
                **_QWEN3_VL_PARAMS, "template_filename_axmodel": layers, "filename_image_encoder_axmodel": vision,
                "cmm_size": cmm, "ext_scripts": [f"tokenizer_{model}.py"]}}
    for model, layers, vision, cmm in (
        ("qwen3-vl-2B-Int4-ax630c", "qwen3_vl_text_p64_l%d_together.axmodel",
         "Qwen3-VL-2B-Instruct_vision_u8_384_ax630c.axmodel", 3098624),
        ("qwen3-vl-2B-Int4-ax650", "qwen3_vl_text_p128_l%d_together.axmodel", "Qwen3-VL-2B-Instruct_vision.axmodel",
         3582336))}
MODE_FILES.update(QWEN3_VL_MODE_FILES)
# The tokenizer scripts' --model_id defaults (StackFlow passes <model>/tokenizer instead).
SCRIPT_TOKENIZER = {"internvl2-1B-ax630c": "internvl2_tokenizer", "internvl2.5-1B-ax630c": "internvl2_tokenizer",
                    "internvl2.5-1B-364-ax630c": "internvl2_tokenizer",
                    "internvl3-1B-448-ax630c": "internvl3_tokenizer", "internvl3-1B-448-ax650": "internvl3_tokenizer",
                    "qwen3-vl-2B-Int4-ax630c": "tokenizer", "qwen3-vl-2B-Int4-ax650": "tokenizer"}


@dataclass(frozen=True)
class Build:
    """What a package's graphs declare: what `pulsar2 llm_build` was told."""

    kv_capacity: int
    prefill_chunk: int
    history_lengths: tuple[int, ...] = ()
    vision_input: str = "uint8_nhwc"
    vision_output: str | None = None  # None: bf16 like every other boundary

    def spec(self) -> dict:
        return {"kv_capacity": self.kv_capacity, "prefill_chunk": self.prefill_chunk,
                "history_lengths": list(self.history_lengths), "placeholder": "hidden",
                "vision_input": self.vision_input, "vision_output": self.vision_output}

    def reference_options(self) -> dict:
        """load_model options that build the same graph shapes from the checkpoint."""
        return {"kv_capacity": self.kv_capacity, "prefill_chunk": self.prefill_chunk,
                "history_lengths": self.history_lengths}


@dataclass(frozen=True)
class Published:
    """One published package: who ships it, its family, image size, build and layout."""

    name: str
    maker: str  # "m5stack" | "axera"
    family: str  # model_factory.FAMILIES key
    image_size: int
    build: Build
    options: dict = field(default_factory=dict)  # layout variants: empty_config, npy_embeddings

    @property
    def checkpoint_key(self) -> tuple[str, int]:
        return self.family, self.image_size


STEPS_128 = tuple(range(128, 1025, 128))
PUBLISHED = {p.name: p for p in (
    Published("internvl2-1B-ax630c", "m5stack", "internvl2", 224, Build(1023, 128)),
    Published("internvl2.5-1B-ax630c", "m5stack", "internvl2_5", 224, Build(1023, 256)),
    Published("internvl2.5-1B-364-ax630c", "m5stack", "internvl2_5", 364, Build(1023, 256)),
    Published("internvl3-1B-448-ax630c", "m5stack", "internvl2_5", 448,
              Build(1279, 128, STEPS_128, "float32_nchw", "fp32")),
    Published("internvl3-1B-448-ax650", "m5stack", "internvl2_5", 448,
              Build(2047, 128, (512, 1024, 1536), "float32_nchw")),
    Published("InternVL2_5-1B", "axera", "internvl2_5", 364, Build(1023, 256)),
    Published("InternVL3-1B", "axera", "internvl2_5", 448,
              Build(2559, 128, STEPS_128 + (1536, 2048), "float32_nchw", "fp32")),
    Published("InternVL3-1B-empty-config", "axera", "internvl2_5", 448,
              Build(2559, 128, STEPS_128 + (1536, 2048), "float32_nchw", "fp32"), {"empty_config": True}),
    Published("InternVL3-1B-npy", "axera", "internvl2_5", 448,
              Build(2559, 128, STEPS_128 + (1536, 2048), "float32_nchw", "fp32"), {"npy_embeddings": True}),
)}
QWEN3_VL_PUBLISHED = {p.name: p for p in (
    Published("qwen3-vl-2B-Int4-ax630c", "m5stack", "qwen3_vl", 96, Build(1023, 64, tuple(range(64, 513, 64)))),
    Published("qwen3-vl-2B-Int4-ax650", "m5stack", "qwen3_vl", 96, Build(2047, 128, tuple(range(128, 1153, 128)))),
)}


def _graph(path: Path, checkpoint: Path, graph: str, build: Build) -> None:
    spec = {"format": STANDIN_FORMAT, "checkpoint": str(checkpoint), "graph": graph, "precision": "bf16",
            **build.spec()}
    path.write_text(json.dumps(spec))


def _write_graphs(checkpoint: Path, folder: Path, build: Build, layer_name: str, post: str, vision: str,
                  embeddings: str, n_layers: int = TINY["axmodel_num"]) -> None:
    from npu.embeddings import export_embeddings

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_layers):
        _graph(folder / (layer_name % i), checkpoint, f"layer{i}", build)
    _graph(folder / post, checkpoint, "post", build)
    _graph(folder / vision, checkpoint, "vision", build)
    if embeddings.endswith(".npy"):  # AXERA's Python runners: the float32 table as a NumPy file
        from npu.reference.checkpoint import load_checkpoint

        np.save(folder / embeddings, np.asarray(load_checkpoint(checkpoint)[1]["embed"], np.float32))
    else:
        export_embeddings(checkpoint, folder / embeddings)


def _tokenizer(checkpoint: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json"):
        shutil.copyfile(checkpoint / name, folder / name)


def build_m5stack(package: Published, checkpoint: Path, prefix: Path) -> Path:
    """/opt/m5stack as the package's deb lays it out; returns data/<model>/."""
    mode = MODE_FILES[package.name]
    params = mode["mode_param"]
    model_dir = prefix / "data" / package.name
    vision_key = next(k for k in ("filename_image_encoder_axmodel", "filename_vpm_resampler_axmodedl") if k in params)
    _write_graphs(checkpoint, model_dir, package.build, params["template_filename_axmodel"],
                  params["filename_post_axmodel"], params[vision_key], params["filename_tokens_embed"],
                  params["axmodel_num"])
    _tokenizer(checkpoint, model_dir / "tokenizer")  # StackFlow: --model_id <model dir>/tokenizer
    (prefix / "data" / "models").mkdir(parents=True, exist_ok=True)
    (prefix / "data" / "models" / f"mode_{package.name}.json").write_text(json.dumps(mode, indent=4))
    (prefix / "scripts").mkdir(exist_ok=True)
    (prefix / "scripts" / params["ext_scripts"][0]).write_text(
        "import argparse\nparser = argparse.ArgumentParser()\n"
        f"parser.add_argument('--model_id', type=str, default='{SCRIPT_TOKENIZER[package.name]}')\n")
    return model_dir


def build_axera(package: Published, checkpoint: Path, root: Path, torch_model) -> Path:
    """An AXERA-TECH Hugging Face repository as downloaded; returns the repository root."""
    root.mkdir(parents=True, exist_ok=True)
    config = "" if package.options.get("empty_config") else json.dumps(model_factory.original_config(torch_model))
    (root / "config.json").write_text(config)
    if package.name == "InternVL2_5-1B":
        folder, tokenizer = root / "internvl2_5_1b_364_ax630c", root / "internvl2_5_tokenizer"
        _write_graphs(checkpoint, folder, package.build, "qwen2_p256_l%d_together.axmodel", "qwen2_post.axmodel",
                      "vit_intern_sim_space2depth.axmodel", "model.embed_tokens.weight.bfloat16.bin")
        extras = ["internvl2_5_tokenizer_364.py", "main", "run_internvl2_5_364_ax630c.sh"]
    else:
        folder, tokenizer = root / "internvl3_1b_ax650", root / "internvl3_tokenizer"
        embeddings = "model.embed_tokens.weight.npy" if package.options.get("npy_embeddings") else \
            "model.embed_tokens.weight.bfloat16.bin"
        _write_graphs(checkpoint, folder, package.build, "qwen2_p128_l%d_together.axmodel", "qwen2_post.axmodel",
                      "internvl3_1b_vit.axmodel", embeddings)
        (root / "post_config.json").write_text(json.dumps(AX_LLM_POST_CONFIG, indent=4))
        extras = ["gradio_demo.py", "internvl3_tokenizer.py", "main_api_ax650", "main_api_axcl_x86", "main_ax650",
                  "main_axcl_x86", "README.md"] + [f"run_internvl_3_1b_448_{kind}.sh" for kind in
                                                   ("api_ax650", "api_axcl_x86", "ax650", "axcl_x86")]
        Image.fromarray(model_factory.random_image(1, 120, 160)).save(root / "ssd_car.jpg")
    _tokenizer(checkpoint, tokenizer)
    for name in extras:
        (root / name).write_text("")
    return root


@pytest.fixture(scope="session")
def published_checkpoints(tmp_path_factory):
    """Tiny checkpoints by (family, image size), built once: `get(key) -> TinyModel`."""
    made: dict[tuple[str, int], model_factory.TinyModel] = {}

    def get(key: tuple[str, int]) -> model_factory.TinyModel:
        if key not in made and key[0] == "qwen3_vl":
            from tests import model_factory_qwen3vl

            made[key] = model_factory_qwen3vl.build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"), seed=4)
        if key not in made:
            family, size = key
            made[key] = model_factory.build_internvl_native(tmp_path_factory.mktemp(f"{family}_{size}"), seed=4,
                                                            family=family, image_size=size)
        return made[key]

    return get


@pytest.fixture(scope="session")
def published_package(published_checkpoints, tmp_path_factory):
    """`get(name) -> (package, path, checkpoint)`: path is the model folder (M5Stack) or the
    repository root (AXERA), built once per session."""
    made: dict[str, tuple[Published, Path, model_factory.TinyModel]] = {}

    def get(name: str):
        if name not in made:
            package = PUBLISHED[name] if name in PUBLISHED else QWEN3_VL_PUBLISHED[name]
            checkpoint = published_checkpoints(package.checkpoint_key)
            out = tmp_path_factory.mktemp(name.replace(".", "_"))
            if package.maker == "m5stack":
                path = build_m5stack(package, checkpoint.path, out / "opt" / "m5stack")
            else:
                path = build_axera(package, checkpoint.path, out / package.name.split("-empty")[0].split("-npy")[0],
                                   checkpoint.torch_model)
            made[name] = (package, path, checkpoint)
        return made[name]

    return get
