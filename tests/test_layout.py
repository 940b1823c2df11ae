"""Model directory detection (npu/layout.py) on directories laid out as they ship."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npu.board.layout import LayoutError, detect_layout


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def tokenizer_folder(path: Path, config: dict | None = None) -> Path:
    touch(path / "vocab.json", "{}")
    touch(path / "merges.txt")
    if config is not None:
        touch(path / "config.json", json.dumps(config))
    return path


def axera_dir(root: Path, n_layers: int = 3, skip: int | None = None) -> Path:
    model = root / "internvl2_1b_axmodel"
    for i in range(n_layers):
        if i != skip:
            touch(model / f"qwen2_p128_l{i}_together.axmodel")
    touch(model / "qwen2_post.axmodel")
    touch(model / "intervl_vision_part_224.axmodel")
    touch(model / "model.embed_tokens.weight.bfloat16.bin")
    tokenizer_folder(root / "internvl2_1b_tokenizer", {"template": "Hermes-2", "llm_config": {"vocab_size": 151655}})
    return model


def m5stack_tree(root: Path, params: dict | None = None, model: str = "internvl2.5-1B-ax630c") -> Path:
    data = root / "data" / model
    mode_param = {
        "template_filename_axmodel": "qwen2_p320_l%d_together.axmodel", "axmodel_num": 2,
        "filename_post_axmodel": "qwen2_post.axmodel", "filename_tokens_embed": "model.embed_tokens.weight.bfloat16.bin",
        "filename_vpm_resampler_axmodedl": "vit_intern_sim_space2depth.axmodel", "tokens_embed_num": 151674,
        "tokens_embed_size": 896, "img_token_id": 151667, "b_use_topk": False,
        "ext_scripts": [f"tokenizer_{model}.py"],
    }
    mode_param.update(params or {})
    for i in range(2):
        touch(data / f"qwen2_p320_l{i}_together.axmodel")
    for key in ("filename_post_axmodel", "filename_tokens_embed", "filename_vpm_resampler_axmodedl",
                "filename_image_encoder_axmodedl"):
        if mode_param.get(key):
            touch(data / mode_param[key])
    tokenizer_folder(data / "internvl2_tokenizer")
    touch(root / "data" / "models" / f"mode_{model}.json", json.dumps({"mode": model, "mode_param": mode_param}))
    touch(root / "scripts" / f"tokenizer_{model}.py",
          "args.add_argument('--model_id', type=str, default='internvl2_tokenizer')\n")
    return data


def test_axera_llm_build_output_is_recognised(tmp_path):
    layout = detect_layout(axera_dir(tmp_path))
    assert layout.kind == "axera"
    assert [p.name for p in layout.layers] == [f"qwen2_p128_l{i}_together.axmodel" for i in range(3)]
    assert layout.post.name == "qwen2_post.axmodel"
    assert layout.vision.name == "intervl_vision_part_224.axmodel"
    assert layout.embeddings.name == "model.embed_tokens.weight.bfloat16.bin"
    assert layout.tokenizer_dir.name == "internvl2_1b_tokenizer"  # the sibling folder AXERA ships
    assert (layout.template, layout.template_source) == ("Hermes-2", "config.json")
    assert layout.vocab_size == 151655
    assert layout.problems == ()
    assert list(layout.graph_paths()) == ["vision", "layer0", "layer1", "layer2", "post"]


def test_axera_missing_layer_is_named(tmp_path):
    layout = detect_layout(axera_dir(tmp_path, n_layers=4, skip=2))
    assert any("missing for layers [2]" in p for p in layout.problems)


def test_axera_without_tokenizer_or_post_names_both(tmp_path):
    model = tmp_path / "m"
    touch(model / "qwen2_p128_l0_together.axmodel")
    layout = detect_layout(model)
    text = " | ".join(layout.problems)
    assert "_post.axmodel" in text and "tokenizer" in text and "embedding" in text


def test_m5stack_package_found_from_its_data_folder(tmp_path):
    layout = detect_layout(m5stack_tree(tmp_path))
    assert layout.kind == "m5stack"
    assert [p.name for p in layout.layers] == ["qwen2_p320_l0_together.axmodel", "qwen2_p320_l1_together.axmodel"]
    assert layout.vision.name == "vit_intern_sim_space2depth.axmodel"  # under their filename_vpm_resampler_axmodedl
    assert (layout.vocab_size, layout.hidden_size, layout.image_context_id) == (151674, 896, 151667)
    assert layout.tokenizer_dir.name == "internvl2_tokenizer"
    assert any("read from" in note and "tokenizer_" in note for note in layout.notes)
    # No config.json in M5Stack packages: the template is inferred from the model name, and says so.
    assert layout.template == "internvl2_5" and "assumed" in layout.template_source
    assert layout.problems == ()


def test_m5stack_tokenizer_folder_stackflow_passes_wins(tmp_path):
    data = m5stack_tree(tmp_path)
    tokenizer_folder(data / "tokenizer")  # what StackFlow passes as --model_id
    assert detect_layout(data).tokenizer_dir == data / "tokenizer"


def test_m5stack_mode_json_can_be_passed_directly(tmp_path):
    data = m5stack_tree(tmp_path)
    layout = detect_layout(tmp_path / "data" / "models" / "mode_internvl2.5-1B-ax630c.json")
    assert layout.kind == "m5stack" and layout.root == data


def test_m5stack_newer_vision_key_and_brace_template(tmp_path):
    data = m5stack_tree(tmp_path, {"template_filename_axmodel": "qwen2_p320_l{}_together.axmodel",
                                   "filename_vpm_resampler_axmodedl": None,
                                   "filename_image_encoder_axmodedl": "vit_intern_sim_space2depth.axmodel"})
    layout = detect_layout(data)
    assert layout.vision.name == "vit_intern_sim_space2depth.axmodel"
    assert all(p.is_file() for p in layout.layers)


def test_m5stack_missing_files_are_named(tmp_path):
    data = m5stack_tree(tmp_path, {"axmodel_num": 3})
    (data / "qwen2_post.axmodel").unlink()
    layout = detect_layout(data)
    text = " | ".join(layout.problems)
    assert "1 of 3 layer graphs missing, e.g. qwen2_p320_l2_together.axmodel" in text
    assert "filename_post_axmodel names qwen2_post.axmodel, which is missing" in text


def test_manifest_names_everything(tmp_path):
    touch(tmp_path / "blk_0.axmodel")
    touch(tmp_path / "blk_1.axmodel")
    touch(tmp_path / "head.axmodel")
    touch(tmp_path / "emb.bin")
    tokenizer_folder(tmp_path / "tok")
    touch(tmp_path / "vlmd.toml", '[model]\nlayers = "blk_{i}.axmodel"\nnum_layers = 2\npost = "head.axmodel"\n'
                                  'embeddings = "emb.bin"\ntokenizer = "tok"\nvocab_size = 100\nhidden_size = 8\n'
                                  'template = "internvl2_5"\n')
    layout = detect_layout(tmp_path)
    assert layout.kind == "manifest"
    assert [p.name for p in layout.layers] == ["blk_0.axmodel", "blk_1.axmodel"]
    assert layout.vision is None and layout.post.name == "head.axmodel"
    assert (layout.vocab_size, layout.hidden_size, layout.template) == (100, 8, "internvl2_5")
    assert layout.problems == ()


def test_manifest_without_layers_is_a_problem(tmp_path):
    tokenizer_folder(tmp_path)
    touch(tmp_path / "vlmd.toml", 'post = "p.axmodel"\n')
    problems = " | ".join(detect_layout(tmp_path).problems)
    assert "needs `layers`" in problems and "p.axmodel, which is missing" in problems and "lacks `embeddings`" in problems


def test_hugging_face_checkpoint(tmp_path):
    touch(tmp_path / "config.json", json.dumps({"template": "Hermes-2"}))
    touch(tmp_path / "model.safetensors")
    layout = detect_layout(tmp_path)
    assert layout.kind == "hf" and not layout.is_compiled and layout.config["template"] == "Hermes-2"


def test_unknown_directory_says_what_was_looked_for(tmp_path):
    touch(tmp_path / "readme.txt")
    with pytest.raises(LayoutError) as info:
        detect_layout(tmp_path)
    message = str(info.value)
    assert "vlmd.toml" in message and "mode_<name>.json" in message and "_together.axmodel" in message
    assert "readme.txt" in message


def test_missing_directory(tmp_path):
    with pytest.raises(LayoutError, match="no such model directory"):
        detect_layout(tmp_path / "nope")
