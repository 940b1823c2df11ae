"""Model directories as they ship: find the graphs, embeddings and tokenizer of a model.

Four layouts are recognised, in this order:

1. `manifest`: a `vlmd.toml` in the directory names every piece explicitly (for any
   layout the rules below do not cover). Keys, all paths relative to the directory:
   `layers` (a file name with `{i}` for the layer index) and `num_layers`, `post`,
   `embeddings`, optional `vision`, `tokenizer` (a folder), `config` (a Hugging Face
   config.json), `vocab_size`, `hidden_size`, `template`, `image_context_id`.
2. `hf`: a Hugging Face checkpoint (config.json + *.safetensors); the reference backend
   builds its graphs, nothing here is read from disk beyond the config.
3. `m5stack`: an installed M5Stack package, `/opt/m5stack/data/<model>/` described by
   `/opt/m5stack/data/models/mode_<model>.json` (found beside the directory's parent,
   or inside the directory, or passed directly). Its `mode_param` names the files:
   `template_filename_axmodel` (printf `%d` or `{}` for the layer), `axmodel_num`,
   `filename_post_axmodel`, `filename_tokens_embed`, the vision graph under
   `filename_vpm_resampler_axmodedl` (their spelling) or `filename_image_encoder_axmodedl`,
   `tokens_embed_num` (vocab rows), `tokens_embed_size` (hidden), `img_token_id`,
   `b_use_topk`, `cmm_size` (KiB of device memory the model takes). The tokenizer is served by a Python script (`ext_scripts`, or
   /opt/m5stack/scripts/<model>_tokenizer.py) that StackFlow starts with `--model_id
   <model dir>/tokenizer`; otherwise the script's own `--model_id` default names the
   folder. vlmd reads that folder's files directly and never runs the script.
4. `axera`: Pulsar2 `llm_build` output plus AXERA's embed tools: `<arch>_p<chunk>_l<i>_together.axmodel`,
   `<arch>_post.axmodel`, a vision graph (`*vision*`/`*vit*`/`*image_encoder*` .axmodel),
   `model.embed_tokens.weight.bfloat16.bin`, tokenizer files here or in a `*tokenizer*`
   folder beside or below.

Chat template (the checkpoint's `template` field): config.json when one is found (in
the directory, its tokenizer folder or the manifest); otherwise inferred from the
model name (InternVL2.5/3 -> `internvl2_5`, InternVL2 -> `Hermes-2`) and reported as an
assumption. Shapes, dtypes and the KV capacity are never taken from names: the board
loader reads them from the graphs.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

MANIFEST_NAME = "vlmd.toml"
LAYER_RE = re.compile(r"^(?P<arch>.+)_p(?P<chunk>\d+)_l(?P<index>\d+)_together\.axmodel$")
VISION_RE = re.compile(r"vision|vit|image_encoder|vpm", re.IGNORECASE)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
M5STACK_VISION_KEYS = ("filename_vpm_resampler_axmodedl", "filename_image_encoder_axmodedl")


class LayoutError(ValueError):
    """A directory that is not a model vlmd can read; the message says what was looked for."""


@dataclass(frozen=True)
class ModelLayout:
    """Where a model's pieces are. `problems` lists missing or inconsistent pieces."""

    kind: str  # "hf", "axera", "m5stack" or "manifest"
    root: Path
    vision: Path | None = None
    layers: tuple[Path, ...] = ()
    post: Path | None = None
    embeddings: Path | None = None
    tokenizer_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    vocab_size: int | None = None  # declared by the package (rows of the embedding file)
    hidden_size: int | None = None
    template: str | None = None
    template_source: str = ""
    image_context_id: int | None = None  # declared by the package, checked against the tokenizer
    post_topk: bool | None = None
    declared_cmm_kb: int | None = None  # M5Stack mode files' cmm_size (KiB of device memory the model takes)
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def is_compiled(self) -> bool:
        return self.kind != "hf"

    def graph_paths(self) -> dict[str, Path]:
        """Graph name -> file, in the order the engine uses them."""
        graphs = {} if self.vision is None else {"vision": self.vision}
        graphs.update({f"layer{i}": path for i, path in enumerate(self.layers)})
        if self.post is not None:
            graphs["post"] = self.post
        return graphs


def detect_layout(path: str | Path) -> ModelLayout:
    """Recognise the model at `path` (a directory, or an M5Stack mode_*.json) or raise LayoutError."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _m5stack(_m5stack_root(path), path)
    if not path.is_dir():
        raise LayoutError(f"{path}: no such model directory")
    if (path / MANIFEST_NAME).is_file():
        return _manifest(path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        config = _read_json(path / "config.json")
        template, source = (str(config["template"]), "config.json") if config.get("template") else \
            (None, "none in config.json: Qwen2 ChatML")
        return ModelLayout("hf", path, tokenizer_dir=path if _has_tokenizer(path) else None, config=config,
                           vocab_size=_text_config(config).get("vocab_size"), template=template,
                           template_source=source,
                           notes=("Hugging Face checkpoint: graphs are built by the reference backend,"
                                  " embeddings exported from its weights",))
    mode_file = _find_mode_file(path)
    if mode_file is not None:
        return _m5stack(path, mode_file)
    if any(LAYER_RE.match(p.name) for p in path.glob("*.axmodel")):
        return _axera(path)
    found = sorted(p.name for p in path.iterdir())[:12]
    raise LayoutError(
        f"{path}: not a model directory vlmd recognises. Looked for {MANIFEST_NAME}; config.json +"
        " *.safetensors (Hugging Face); models/mode_<name>.json (M5Stack package);"
        f" <arch>_p<chunk>_l<i>_together.axmodel (Pulsar2 llm_build). Found: {found}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LayoutError(f"{path}: unreadable JSON ({exc})") from exc


# --- Pulsar2 llm_build output -------------------------------------------------------------


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
    embeddings = _find_embeddings(root, problems)
    tokenizer_dir = _find_tokenizer_dir(root, problems)
    config = _find_config(root, tokenizer_dir)
    template, source = _template(config, root.name)
    return ModelLayout(
        "axera", root, vision=visions[0] if len(visions) == 1 else None, layers=layers,
        post=posts[0] if posts else None, embeddings=embeddings, tokenizer_dir=tokenizer_dir, config=config,
        vocab_size=_text_config(config).get("vocab_size"), hidden_size=_text_config(config).get("hidden_size"),
        template=template, template_source=source, notes=tuple(notes), problems=tuple(problems),
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


def _find_embeddings(root: Path, problems: list[str]) -> Path | None:
    candidates = sorted(root.glob("*embed_tokens*.bin")) or sorted(root.glob("*embed*.bin"))
    if not candidates:
        problems.append("no embedding file (model.embed_tokens.weight.bfloat16.bin)")
        return None
    if len(candidates) > 1:
        problems.append(f"several embedding files {[p.name for p in candidates]}: name one in {MANIFEST_NAME}")
    return candidates[0]


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _find_tokenizer_dir(root: Path, problems: list[str], hint: str | None = None) -> Path | None:
    """The tokenizer folder: `hint`, the directory itself, a *tokenizer* folder below or beside it."""
    candidates = [root / hint, root.parent / hint] if hint else []
    candidates.append(root)
    for base in (root, root.parent):
        if base.is_dir():
            candidates += sorted(p for p in base.iterdir() if p.is_dir() and "tokenizer" in p.name.lower())
    for directory in candidates:
        if directory.is_dir() and _has_tokenizer(directory):
            return directory
    problems.append("no tokenizer files (tokenizer.json or vocab.json + merges.txt) here or in a *tokenizer* folder")
    return None


def _find_config(root: Path, tokenizer_dir: Path | None) -> dict[str, Any]:
    for directory in (root, tokenizer_dir, root.parent):
        if directory is not None and (directory / "config.json").is_file():
            return _read_json(directory / "config.json")
    return {}


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's section of a config.json (original, transformers-native or plain)."""
    return config.get("llm_config") or config.get("text_config") or config


def _template(config: dict[str, Any], model_name: str) -> tuple[str | None, str]:
    if config.get("template"):
        return str(config["template"]), "config.json"
    name = model_name.lower().replace("_", ".")
    if "internvl2.5" in name or "internvl3" in name:
        return "internvl2_5", f"assumed from the model name {model_name!r} (no config.json with a template)"
    if "internvl2" in name or "intervl2" in name:
        return "Hermes-2", f"assumed from the model name {model_name!r} (no config.json with a template)"
    return None, "unknown: add config.json or `template` in vlmd.toml"


# --- M5Stack packages -----------------------------------------------------------------------


def _find_mode_file(root: Path) -> Path | None:
    for candidate in (root.parent / "models" / f"mode_{root.name}.json", root / f"mode_{root.name}.json"):
        if candidate.is_file():
            return candidate
    inside = sorted(root.glob("mode_*.json"))
    return inside[0] if len(inside) == 1 else None


def _m5stack_root(mode_file: Path) -> Path:
    """/opt/m5stack/data/models/mode_<model>.json -> /opt/m5stack/data/<model>/."""
    data = _read_json(mode_file)
    model = data.get("mode") or mode_file.stem.removeprefix("mode_")
    installed = mode_file.parent.parent / model
    if installed.is_dir():
        return installed
    if any(mode_file.parent.glob("*.axmodel")):  # the description kept inside the model folder
        return mode_file.parent
    raise LayoutError(f"{mode_file}: model folder {mode_file.parent.parent / model} not found")


def _layer_name(template: str, index: int) -> str:
    return template.replace("{}", str(index)) if "{}" in template else template % index


def _m5stack(root: Path, mode_file: Path) -> ModelLayout:
    params = _read_json(mode_file).get("mode_param")
    if not isinstance(params, dict):
        raise LayoutError(f"{mode_file}: no mode_param object (not an M5Stack model description)")
    notes = [f"M5Stack package described by {mode_file}"]
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
        layers = tuple(root / _layer_name(template_name, i) for i in range(count))
        absent = [p.name for p in layers if not p.is_file()]
        if absent:
            problems.append(f"{len(absent)} of {count} layer graphs missing, e.g. {absent[0]}")
    vision_key = next((k for k in M5STACK_VISION_KEYS if params.get(k)), None)
    vision = file(vision_key) if vision_key else None
    if vision_key is None:
        notes.append("no vision graph named (filename_vpm_resampler_axmodedl): text-only")
    post, embeddings = file("filename_post_axmodel"), file("filename_tokens_embed")
    for key, value in (("filename_post_axmodel", post), ("filename_tokens_embed", embeddings)):
        if value is None:
            problems.append(f"mode_param lacks {key}")
    # StackFlow starts the tokenizer script with `--model_id <model dir>/tokenizer`; packages that
    # ship the folder under another name rely on the script's own --model_id default.
    if _has_tokenizer(root / "tokenizer"):
        tokenizer_dir = root / "tokenizer"
    else:
        script_hint, script_note = _tokenizer_hint(root, mode_file, params)
        if script_note:
            notes.append(script_note)
        tokenizer_dir = _find_tokenizer_dir(root, problems, script_hint)
    config = _find_config(root, tokenizer_dir)
    template, source = _template(config, str(_read_json(mode_file).get("mode") or root.name))
    return ModelLayout(
        "m5stack", root, vision=vision, layers=layers, post=post, embeddings=embeddings,
        tokenizer_dir=tokenizer_dir, config=config, vocab_size=params.get("tokens_embed_num"),
        hidden_size=params.get("tokens_embed_size"), template=template, template_source=source,
        image_context_id=params.get("img_token_id"), post_topk=params.get("b_use_topk"),
        declared_cmm_kb=params["cmm_size"] if isinstance(params.get("cmm_size"), int) else None,
        notes=tuple(notes), problems=tuple(problems),
    )


def _tokenizer_hint(root: Path, mode_file: Path, params: dict[str, Any]) -> tuple[str | None, str]:
    """The folder the package's tokenizer script loads (`--model_id` default), if the script is found."""
    model = root.name
    for script_name in [*(params.get("ext_scripts") or []), f"{model}_tokenizer.py", f"tokenizer_{model}.py"]:
        for base in (root, mode_file.parent, mode_file.parent.parent / "scripts", root.parent.parent / "scripts"):
            script = base / script_name
            if script.is_file():
                match = re.search(r"""['"]--model_id['"][^)]*?default\s*=\s*['"]([^'"]+)['"]""",
                                  script.read_text(encoding="utf-8", errors="replace"))
                if match:
                    return match[1], f"tokenizer folder {match[1]!r} read from {script}"
                return None, f"tokenizer script {script} names no --model_id folder"
    return None, ""


# --- vlmd.toml --------------------------------------------------------------------------------


def _manifest(root: Path) -> ModelLayout:
    manifest_path = root / MANIFEST_NAME
    try:
        manifest = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LayoutError(f"{manifest_path}: {exc}") from exc
    manifest = manifest.get("model", manifest)
    problems: list[str] = []

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
    if not _has_tokenizer(tokenizer_dir):
        problems.append(f"no tokenizer files in {tokenizer_dir}")
    config_path = file("config", required=False)
    config = _read_json(config_path) if config_path and config_path.is_file() else _find_config(root, tokenizer_dir)
    if manifest.get("template"):
        template, source = str(manifest["template"]), MANIFEST_NAME
    else:
        template, source = _template(config, root.name)
    llm = _text_config(config)
    return ModelLayout(
        "manifest", root, vision=file("vision", required=False), layers=layers, post=file("post"),
        embeddings=file("embeddings"), tokenizer_dir=tokenizer_dir, config=config,
        vocab_size=manifest.get("vocab_size", llm.get("vocab_size")),
        hidden_size=manifest.get("hidden_size", llm.get("hidden_size")), template=template,
        template_source=source, image_context_id=manifest.get("image_context_id"),
        post_topk=manifest.get("post_topk"), notes=(f"explicit manifest {manifest_path}",),
        problems=tuple(problems),
    )
