"""Model directories as they ship: find the graphs, embeddings and tokenizer of a model.

Layouts, recognised in this order:

1. `manifest`: a `vlmd.toml` in the directory names every piece explicitly (for any
   layout the rules below do not cover). Keys, all paths relative to the directory:
   `layers` (a file name with `{i}` for the layer index) and `num_layers`, `post`,
   `embeddings`, optional `vision`, `tokenizer` (a folder), `config` (a Hugging Face
   config.json), `vocab_size`, `hidden_size`, `template`, `image_context_id`.
2. `hf`: a Hugging Face checkpoint (config.json + *.safetensors); the reference backend
   builds its graphs, nothing here is read from disk beyond the configs.
3. `m5stack`: an installed M5Stack package, `/opt/m5stack/data/<model>/` with a mode
   file where StackFlow looks for one, or the mode file itself (npu/board/m5stack.py).
4. `axera`: Pulsar2 `llm_build` output with AXERA's embed tools:
   `<arch>_p<chunk>_l<i>_together.axmodel`, `<arch>_post.axmodel`, a vision graph
   (`*vision*`/`*vit*`/`*image_encoder*` .axmodel), the embeddings as
   `model.embed_tokens.weight.bfloat16.bin` or `model.embed_tokens.weight.npy`, tokenizer
   files here or in a `*tokenizer*` folder beside or below. AXERA's Hugging Face
   repositories are found from the repository root too: InternVL2_5-1B holds
   `internvl2_5_1b_364_ax630c/` beside `internvl2_5_tokenizer/` and config.json;
   InternVL3-1B `internvl3_1b_ax650/`, `internvl3_tokenizer/`, config.json (0 bytes in
   several AXERA repos: read as no config) and post_config.json (sampling defaults).

Chat template (npu/text/chat_templates.py): a config.json `template` (the directory,
its tokenizer folder, the folder above), else the Jinja chat template the checkpoint
carries, else for compiled packages the family their names say (InternVL2.5/3 ->
`internvl2_5`, InternVL2 -> `Hermes-2`), reported as an assumption. Shapes, dtypes and
the KV capacity are never taken from names: the board loader reads them from the graphs.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

from npu.board.layout_parts import (
    MANIFEST_NAME, LayoutError, ModelLayout, choose_template, config_dirs, family_from_names, find_config, find_embeddings,
    find_image_processor, find_post_config, find_tokenizer_dir, has_tokenizer, read_json, text_config,
)
from npu.board.m5stack import find_mode_file, m5stack_layout, model_root

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["MANIFEST_NAME", "LayoutError", "ModelLayout", "detect_layout"]

LAYER_RE = re.compile(r"^(?P<arch>.+)_p(?P<chunk>\d+)_l(?P<index>\d+)_together\.axmodel$")
VISION_RE = re.compile(r"vision|vit|image_encoder|vpm", re.IGNORECASE)


def detect_layout(path: str | Path) -> ModelLayout:
    """Recognise the model at `path` (a directory, or an M5Stack mode_*.json) or raise LayoutError."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".json":
        return m5stack_layout(model_root(path), path)
    if not path.is_dir():
        raise LayoutError(f"{path}: no such model directory")
    if (path / MANIFEST_NAME).is_file():
        return _manifest(path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return _hugging_face(path)
    mode_file = find_mode_file(path)
    if mode_file is not None:
        return m5stack_layout(path, mode_file)
    if _has_layers(path):
        return _axera(path)
    folders = sorted(p for p in path.iterdir() if p.is_dir() and _has_layers(p))
    if len(folders) == 1:  # an AXERA repository root: the model folder inside it
        layout = _axera(folders[0])
        return _with_note(layout, f"model folder {folders[0].name}/ of the repository {path}")
    if len(folders) > 1:
        raise LayoutError(f"{path} holds several compiled models {[p.name for p in folders]}:"
                          " pass the one for this board")
    found = sorted(p.name for p in path.iterdir())[:12]
    raise LayoutError(
        f"{path}: not a model directory vlmd recognises. Looked for {MANIFEST_NAME}; config.json +"
        " *.safetensors (Hugging Face); models/mode_<name>.json (M5Stack package);"
        f" <arch>_p<chunk>_l<i>_together.axmodel (Pulsar2 llm_build, or a folder of them). Found: {found}"
    )


# config.json model_type -> model family (npu/families/)
HF_FAMILIES = {"qwen3_vl": "qwen3_vl", "smolvlm": "smolvlm", "idefics3": "smolvlm"}


def _has_layers(directory: Path) -> bool:
    return any(LAYER_RE.match(p.name) for p in directory.glob("*.axmodel"))


def _with_note(layout: ModelLayout, note: str) -> ModelLayout:
    return replace(layout, notes=(note, *layout.notes))


def _hugging_face(root: Path) -> ModelLayout:
    config = read_json(root / "config.json")
    if config is None:
        raise LayoutError(f"{root}/config.json is empty: a Hugging Face checkpoint needs its config")
    choice = choose_template(config, [root], family_names=None)
    return ModelLayout("hf", root, tokenizer_dir=root if has_tokenizer(root) else None, config=config,
                       vocab_size=text_config(config).get("vocab_size"), template=choice.template,
                       chat_template=choice.chat_template, template_source=choice.source,
                       image_processor=find_image_processor([root]),
                       family=HF_FAMILIES.get(config.get("model_type"), "internvl"),
                       notes=("Hugging Face checkpoint: graphs are built by the reference backend,"
                              " embeddings exported from its weights",))


# --- Pulsar2 llm_build output ---------------------------------------------------------------


def _axera(root: Path) -> ModelLayout:
    notes = ["Pulsar2 llm_build output (layer graphs named <arch>_p<chunk>_l<i>_together.axmodel)"]
    problems: list[str] = []
    by_index: dict[int, Path] = {}
    chunks = set()
    for p in root.glob("*.axmodel"):
        match = LAYER_RE.match(p.name)
        if match:
            by_index[int(match["index"])] = p
            chunks.add(int(match["chunk"]))
    layers = _contiguous_layers(by_index, problems)
    if len(chunks) > 1:
        problems.append(f"layer files name different prefill chunks {sorted(chunks)}: mixed builds")
    posts = sorted(root.glob("*_post.axmodel"))
    if not posts:
        problems.append("no *_post.axmodel (the post graph: final norm + lm_head)")
    visions = sorted(p for p in root.glob("*.axmodel") if VISION_RE.search(p.name) and not LAYER_RE.match(p.name))
    if not visions:
        notes.append("no vision graph (*vision*/*vit*.axmodel): text-only")
    elif len(visions) > 1:
        problems.append(f"several vision graphs {[p.name for p in visions]}: name one in {MANIFEST_NAME}")
    embeddings = find_embeddings(root, problems)
    tokenizer_dir = find_tokenizer_dir(root, problems)
    dirs = config_dirs(root, tokenizer_dir)
    config = find_config(dirs, notes, problems)
    names = [root.name] + ([tokenizer_dir.name] if tokenizer_dir else []) + [root.parent.name]
    choice = choose_template(config, dirs, names)
    sampling, sampling_source = find_post_config(dirs, notes)
    llm = text_config(config)
    return ModelLayout(
        "axera", root, vision=visions[0] if len(visions) == 1 else None, layers=layers,
        post=posts[0] if posts else None, embeddings=embeddings, tokenizer_dir=tokenizer_dir, config=config,
        vocab_size=llm.get("vocab_size"), hidden_size=llm.get("hidden_size"), template=choice.template,
        chat_template=choice.chat_template, template_source=choice.source, sampling=sampling,
        sampling_source=sampling_source, image_processor=find_image_processor(dirs), notes=tuple(notes),
        problems=tuple(problems), family=family_from_names(*(p.name for p in (*layers, *visions))),
    )


def _contiguous_layers(by_index: dict[int, Path], problems: list[str]) -> tuple[Path, ...]:
    if not by_index:
        problems.append("no decoder layer graphs")
        return ()
    missing = sorted(set(range(max(by_index) + 1)) - by_index.keys())
    if missing:
        problems.append(f"decoder layer graphs missing for layers {missing}")
        return ()
    return tuple(by_index[i] for i in range(len(by_index)))


# --- vlmd.toml --------------------------------------------------------------------------------


def _manifest(root: Path) -> ModelLayout:
    manifest_path = root / MANIFEST_NAME
    try:
        manifest = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LayoutError(f"{manifest_path}: {exc}") from exc
    manifest = manifest.get("model", manifest)
    problems: list[str] = []
    notes = [f"explicit manifest {manifest_path}"]

    def file(key: str, required: bool = True) -> Path | None:
        name = manifest.get(key)
        if not name:
            if required:
                problems.append(f"{MANIFEST_NAME} lacks `{key}`")
            return None
        path = root / name
        if not path.exists():
            problems.append(f"{MANIFEST_NAME} `{key}` names {name}, which is missing")
        return path

    layers: tuple[Path, ...] = ()
    if "layers" in manifest and isinstance(manifest.get("num_layers"), int):
        layers = tuple(root / manifest["layers"].format(i=i) for i in range(manifest["num_layers"]))
        absent = [p.name for p in layers if not p.is_file()]
        if absent:
            problems.append(f"{len(absent)} layer graphs missing, e.g. {absent[0]}")
    else:
        problems.append(f"{MANIFEST_NAME} needs `layers` (a name with {{i}}) and `num_layers`")
    tokenizer_dir = file("tokenizer", required=False) or root
    if not has_tokenizer(tokenizer_dir):
        problems.append(f"no tokenizer files in {tokenizer_dir}")
    config_path = file("config", required=False)
    dirs = config_dirs(root, tokenizer_dir)
    if config_path and config_path.is_file():
        config = read_json(config_path, notes) or {}
    else:
        config = find_config(dirs, notes, problems)
    if manifest.get("template"):
        config = dict(config, template=str(manifest["template"]))
    choice = choose_template(config, dirs, [root.name])
    source = f"{MANIFEST_NAME} `template`" if manifest.get("template") else choice.source
    llm = text_config(config)
    sampling, sampling_source = find_post_config(dirs, notes)
    return ModelLayout(
        "manifest", root, vision=file("vision", required=False), layers=layers, post=file("post"),
        embeddings=file("embeddings"), tokenizer_dir=tokenizer_dir, config=config,
        vocab_size=manifest.get("vocab_size", llm.get("vocab_size")),
        hidden_size=manifest.get("hidden_size", llm.get("hidden_size")), template=choice.template,
        chat_template=choice.chat_template, template_source=source,
        image_context_id=manifest.get("image_context_id"), post_topk=manifest.get("post_topk"),
        sampling=sampling, sampling_source=sampling_source, image_processor=find_image_processor(dirs),
        notes=tuple(notes), problems=tuple(problems), family=family_from_names(*(p.name for p in layers)),
    )
