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
                "filename_image_encoder_axmodel"):
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


def test_m5stack_internvl3_image_encoder_key_and_brace_template(tmp_path):
    """InternVL3 packages name their vision graph `filename_image_encoder_axmodel` (StackFlow's
    main.cpp key; mode_internvl3-1B-448-ax630c.json), not the vpm key InternVL2/2.5 use."""
    data = m5stack_tree(tmp_path, {"template_filename_axmodel": "qwen2_p320_l{}_together.axmodel",
                                   "filename_vpm_resampler_axmodedl": None,
                                   "filename_image_encoder_axmodel": "internvl3_1b_vit.axmodel"})
    layout = detect_layout(data)
    assert layout.vision is not None and layout.vision.name == "internvl3_1b_vit.axmodel"
    assert all(p.is_file() for p in layout.layers)
    assert not any("text-only" in note for note in layout.notes)


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


# --- where StackFlow finds mode files; AXERA's repositories; what packages declare ----------------


@pytest.mark.parametrize("folder, name", [
    ("data/{m}", "{m}.json"), ("data/{m}", "mode_{m}.json"), ("data/models", "{m}.json"),
    ("etc", "mode_{m}.json"), ("etc", "{m}.json"), ("share", "mode_{m}.json"), ("share", "{m}.json"),
])
def test_m5stack_mode_file_is_found_where_stackflow_looks(tmp_path, folder, name):
    """StackFlowUtil.cpp get_config_file_paths: the model folder, data/models/, etc/, share/,
    each with and without the mode_ prefix."""
    model = "internvl2.5-1B-ax630c"
    data = m5stack_tree(tmp_path, model=model)
    mode_file = tmp_path / "data" / "models" / f"mode_{model}.json"
    moved = tmp_path / folder.format(m=model) / name.format(m=model)
    moved.parent.mkdir(parents=True, exist_ok=True)
    text = mode_file.read_text()
    mode_file.unlink()
    moved.write_text(text)
    layout = detect_layout(data)
    assert layout.kind == "m5stack" and str(moved) in layout.notes[0] and layout.problems == ()
    if folder != f"data/{model}":
        assert detect_layout(moved).root == data  # the mode file itself leads to the model folder


def test_m5stack_mode_params_and_sampling_are_kept(tmp_path):
    data = m5stack_tree(tmp_path, {"enable_temperature": True, "temperature": 0.7, "enable_top_p_sampling": False,
                                   "top_p": 0.9, "enable_top_k_sampling": True, "top_k": 40,
                                   "enable_repetition_penalty": False, "repetition_penalty": 1.1,
                                   "precompute_len": 1024, "cmm_size": 1674992, "system_prompt": "Be brief."})
    layout = detect_layout(data)
    assert layout.sampling == {"temperature": 0.7, "top_k": 40, "top_p": 1.0}
    assert layout.mode_params["cmm_size"] == 1674992 and layout.mode_params["precompute_len"] == 1024
    assert layout.config["system_message"] == "Be brief."


@pytest.mark.parametrize("params, expected", [
    ({}, {}),
    ({"enable_temperature": True, "temperature": 0.7}, {"temperature": 0.0}),  # no sampler enabled: argmax
    ({"enable_top_k_sampling": True, "top_k": 10}, {"top_k": 10, "top_p": 1.0, "temperature": 1.0}),
    ({"enable_top_p_sampling": True, "top_p": 0.8, "enable_top_k_sampling": True, "top_k": 10,
      "enable_temperature": True, "temperature": 0.5}, {"top_p": 0.8, "top_k": 0, "temperature": 0.5}),
    ({"enable_repetition_penalty": True, "repetition_penalty": 1.2, "enable_top_k_sampling": False, "top_k": 3},
     {"temperature": 0.0, "repetition_penalty": 1.2}),
])
def test_sampling_keys_mean_what_stackflows_postprocess_does(params, expected):
    from npu.board.layout_parts import sampling_from

    assert sampling_from(params) == expected


def axera_repository(root: Path, config: str, folders=("internvl3_1b_ax650",)) -> Path:
    for folder in folders:
        for i in range(2):
            touch(root / folder / f"qwen2_p128_l{i}_together.axmodel")
        touch(root / folder / "qwen2_post.axmodel")
        touch(root / folder / "internvl3_1b_vit.axmodel")
        touch(root / folder / "model.embed_tokens.weight.bfloat16.bin")
    tokenizer_folder(root / "internvl3_tokenizer")
    touch(root / "config.json", config)
    touch(root / "post_config.json", json.dumps({"enable_temperature": True, "temperature": 0.9,
                                                 "enable_top_k_sampling": True, "top_k": 10}))
    for name in ("main_api_ax650", "internvl3_tokenizer.py", "run_internvl_3_1b_448_api_ax650.sh"):
        touch(root / name)
    return root


def test_axera_repository_root_leads_to_its_model_folder(tmp_path):
    root = axera_repository(tmp_path / "InternVL3-1B", json.dumps({"template": "internvl2_5"}))
    for path in (root, root / "internvl3_1b_ax650"):
        layout = detect_layout(path)
        assert layout.kind == "axera" and layout.root == root / "internvl3_1b_ax650"
        assert layout.tokenizer_dir == root / "internvl3_tokenizer"
        assert (layout.template, layout.template_source) == ("internvl2_5", "config.json")
        assert layout.sampling == {"temperature": 0.9, "top_k": 10, "top_p": 1.0}
        assert layout.vision.name == "internvl3_1b_vit.axmodel" and layout.problems == ()
    assert detect_layout(root).notes[0].startswith("model folder internvl3_1b_ax650/")


def test_a_zero_byte_config_is_no_config_never_a_refusal(tmp_path):
    root = axera_repository(tmp_path / "InternVL3-2B", "")
    layout = detect_layout(root)
    assert layout.config == {} and layout.problems == ()
    assert any("config.json" in note and "empty (0 bytes)" in note for note in layout.notes)
    assert layout.template == "internvl2_5" and "assumed from the package name 'internvl3_1b_ax650'" in \
        layout.template_source


def test_a_repository_with_several_builds_asks_for_one(tmp_path):
    root = axera_repository(tmp_path / "InternVL2_5-1B", "{}", ("internvl2_5_1b_448_ax650", "internvl2_5_1b_364_ax630c"))
    with pytest.raises(LayoutError, match="several compiled models.*internvl2_5_1b_364_ax630c"):
        detect_layout(root)


def test_npy_embeddings_are_found(tmp_path):
    model = axera_dir(tmp_path)
    (model / "model.embed_tokens.weight.bfloat16.bin").unlink()
    touch(model / "model.embed_tokens.weight.npy")
    layout = detect_layout(model)
    assert layout.embeddings.name == "model.embed_tokens.weight.npy" and layout.problems == ()


def test_a_chat_template_in_the_tokenizer_folder_comes_before_the_family(tmp_path):
    data = m5stack_tree(tmp_path)
    config = {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}<|im_end|>"}
    touch(data / "internvl2_tokenizer" / "tokenizer_config.json", json.dumps(config))
    layout = detect_layout(data)
    assert layout.template is None and layout.chat_template == config["chat_template"]
    assert "tokenizer_config.json" in layout.template_source


def test_hugging_face_checkpoint_with_its_own_chat_template(tmp_path):
    touch(tmp_path / "config.json", json.dumps({"model_type": "internvl"}))
    touch(tmp_path / "model.safetensors")
    touch(tmp_path / "chat_template.jinja", "{{ messages }}")
    touch(tmp_path / "preprocessor_config.json", json.dumps({"resample": 3, "image_mean": [0.5, 0.5, 0.5]}))
    layout = detect_layout(tmp_path)
    assert layout.chat_template == "{{ messages }}" and layout.template is None
    assert "chat_template.jinja" in layout.template_source
    assert layout.image_processor["image_mean"] == [0.5, 0.5, 0.5]
