"""M5Stack StackFlow packages: `/opt/m5stack/data/<model>/` described by a mode file.

Read against m5stack/StackFlow (commit d9084bad88331b1913899f624a98cbb93cfdc148):
projects/llm_framework/main_vlm/src/main.cpp `load_model`, the mode_*.json files beside it,
ext_components/StackFlow/stackflow/StackFlowUtil.cpp `get_config_file_paths`, and
projects/llm_framework/tools/llm_pack.py (what a package installs where).

Mode file lookup, in StackFlow's order for a model folder `<prefix>/data/<model>/`:
`<model>/<model>.json`, `<model>/mode_<model>.json`, `<prefix>/data/models/` (the
packages install their mode file there), `<prefix>/etc/`, `<prefix>/share/` (each with or
without the `mode_` prefix); then the same under /opt/m5stack when the folder lives
elsewhere. A mode file may also be passed directly.

`mode_param` keys read (main.cpp's CONFIG_AUTO_SET names): `template_filename_axmodel`
(printf `%d`) with `axmodel_num`, `filename_post_axmodel`, `filename_tokens_embed`, the
vision graph under `filename_image_encoder_axmodel` (InternVL3 packages; main.cpp's
LLM_CTX runner) or `filename_vpm_resampler_axmodedl` (their spelling; InternVL2/2.5
packages, the LLM runner), `tokens_embed_num` (vocab rows), `tokens_embed_size` (hidden),
`img_token_id` (`image_token_id` in the qwen3-vl mode files), `b_use_topk`, `system_prompt` (the system message, when set), and the
sampling keys `enable_temperature`/`temperature`, `enable_top_k_sampling`/`top_k`,
`enable_top_p_sampling`/`top_p`, `enable_repetition_penalty`/`repetition_penalty`.
`cmm_size` (KiB of device memory the model takes) becomes `ModelLayout.declared_cmm_kb`;
`precompute_len` and the rest are kept as given in `ModelLayout.mode_params`.

The tokenizer: StackFlow starts the package's tokenizer script with `--model_id
<model dir>/tokenizer`, so that folder is the tokenizer; a package without it falls back
to the folder the script's own `--model_id` default names. vlmd reads the files directly
and never runs the script. Chat template: a `template` in a config.json beside the
package, else a Jinja chat template its tokenizer folder carries, else the family its
name says (internvl2 -> Hermes-2; internvl2.5, internvl3 -> internvl2_5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from npu.board.layout_parts import (
    LayoutError, ModelLayout, choose_template, config_dirs, find_config, find_image_processor, find_tokenizer_dir,
    family_from_names, has_tokenizer, layer_name, read_json, sampling_from, script_model_id,
)

VISION_KEYS = ("filename_image_encoder_axmodel", "filename_vpm_resampler_axmodedl")
M5STACK_PREFIX = Path("/opt/m5stack")


def _names(model: str) -> tuple[str, str]:
    return f"{model}.json", f"mode_{model}.json"


def mode_file_candidates(root: Path) -> list[Path]:
    """Where StackFlow looks for the mode file of the model folder `root`, in its order."""
    model, prefix = root.name, root.parent.parent
    folders = [root, root.parent / "models", prefix / "etc", prefix / "share"]
    folders += [M5STACK_PREFIX / "data" / "models", M5STACK_PREFIX / "etc", M5STACK_PREFIX / "share"]
    candidates = [folder / name for folder in dict.fromkeys(folders) for name in _names(model)]
    return candidates


def find_mode_file(root: Path) -> Path | None:
    for candidate in mode_file_candidates(root):
        if candidate.is_file():
            return candidate
    inside = sorted(root.glob("mode_*.json"))
    return inside[0] if len(inside) == 1 else None


def model_root(mode_file: Path) -> Path:
    """The model folder of a mode file passed directly: `<prefix>/data/<model>/` for a file in
    data/models/, etc/ or share/, or the file's own folder when it holds the graphs."""
    data = read_json(mode_file) or {}
    if any(mode_file.parent.glob("*.axmodel")):  # the description kept inside the model folder
        return mode_file.parent
    # StackFlow finds a mode file by the requested model's name (get_config_file_paths), so the
    # file's name says which package it describes; its "mode" field can disagree (StackFlow
    # d9084ba mode_smolvlm-500M-ax650.json says "smolvlm-500M-ax630c"): the name is tried first.
    names = dict.fromkeys(n for n in (mode_file.stem.removeprefix("mode_"), data.get("mode")) if isinstance(n, str) and n)
    prefix = mode_file.parent.parent.parent if mode_file.parent.name == "models" else mode_file.parent.parent
    for model in names:
        for folder in (prefix / "data" / model, mode_file.parent.parent / model):
            if folder.is_dir():
                return folder
    raise LayoutError(f"{mode_file}: model folder {prefix / 'data' / next(iter(names), '?')} not found")


def m5stack_layout(root: Path, mode_file: Path) -> ModelLayout:
    mode = read_json(mode_file) or {}
    params = mode.get("mode_param")
    if not isinstance(params, dict):
        raise LayoutError(f"{mode_file}: no mode_param object (not an M5Stack model description)")
    notes = [f"M5Stack package described by {mode_file}"]
    named = mode_file.stem.removeprefix("mode_")
    if mode.get("mode") and mode.get("mode") not in (named, root.name):
        notes.append(f"the mode file says \"mode\": {mode['mode']!r}, its name and folder say {root.name!r}"
                     " (StackFlow loads it by the name)")
    problems: list[str] = []

    def file(key: str) -> Path | None:
        name = params.get(key)
        if not name:
            return None
        path = root / name
        if not path.is_file():
            problems.append(f"{key} names {name}, which is missing")
        return path

    layers: tuple[Path, ...] = ()
    template_name, count = params.get("template_filename_axmodel"), params.get("axmodel_num")
    if not template_name or not isinstance(count, int):
        problems.append("mode_param lacks template_filename_axmodel / axmodel_num")
    else:
        layers = tuple(root / layer_name(template_name, i) for i in range(count))
        absent = [p.name for p in layers if not p.is_file()]
        if absent:
            problems.append(f"{len(absent)} of {count} layer graphs missing, e.g. {absent[0]}")
    vision_key = next((k for k in VISION_KEYS if params.get(k)), None)
    vision = file(vision_key) if vision_key else None
    if vision_key is None:
        notes.append(f"no vision graph named ({' or '.join(VISION_KEYS)}): text-only")
    post, embeddings = file("filename_post_axmodel"), file("filename_tokens_embed")
    for key, value in (("filename_post_axmodel", post), ("filename_tokens_embed", embeddings)):
        if value is None:
            problems.append(f"mode_param lacks {key}")
    tokenizer_dir = _tokenizer_dir(root, mode_file, params, notes, problems)
    dirs = config_dirs(root, tokenizer_dir)
    config = find_config(dirs, notes, problems)
    if params.get("system_prompt") and not config.get("system_message"):
        config = dict(config, system_message=params["system_prompt"])
    names = [str(mode.get("mode") or root.name), root.name] + ([tokenizer_dir.name] if tokenizer_dir else [])
    choice = choose_template(config, dirs, names)
    sampling = sampling_from(params)
    return ModelLayout(
        "m5stack", root, vision=vision, layers=layers, post=post, embeddings=embeddings,
        tokenizer_dir=tokenizer_dir, config=config, vocab_size=params.get("tokens_embed_num"),
        hidden_size=params.get("tokens_embed_size"), template=choice.template, chat_template=choice.chat_template,
        template_source=choice.source, image_context_id=params.get("img_token_id", params.get("image_token_id")),
        post_topk=params.get("b_use_topk"), family=family_from_names(template_name, vision.name if vision else None, root.name),
        declared_cmm_kb=params["cmm_size"] if isinstance(params.get("cmm_size"), int) else None, sampling=sampling, sampling_source=f"{mode_file} mode_param" if sampling else "",
        image_processor=find_image_processor(dirs), mode_params=dict(params), notes=tuple(notes),
        problems=tuple(problems),
    )


def _tokenizer_dir(root: Path, mode_file: Path, params: dict[str, Any], notes: list[str],
                   problems: list[str]) -> Path | None:
    if has_tokenizer(root / "tokenizer"):  # what StackFlow passes as --model_id
        return root / "tokenizer"
    hint = None
    model = root.name
    for script_name in [*(params.get("ext_scripts") or []), f"{model}_tokenizer.py", f"tokenizer_{model}.py"]:
        scripts = (root, mode_file.parent, mode_file.parent.parent / "scripts", root.parent.parent / "scripts",
                   M5STACK_PREFIX / "scripts")
        script = next((base / script_name for base in scripts if (base / script_name).is_file()), None)
        if script is not None:
            hint = script_model_id(script)
            notes.append(f"tokenizer folder {hint!r} read from {script}" if hint else
                         f"tokenizer script {script} names no --model_id folder")
            break
    return find_tokenizer_dir(root, problems, hint)
