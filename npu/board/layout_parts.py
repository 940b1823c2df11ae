"""What every model layout is made of (`ModelLayout`) and the finders the layouts share:
JSON files as packages ship them (a 0-byte config.json is "no config"), tokenizer
folders, configs, embedding files, the chat template and sampling defaults a package
declares, and the image processor config.

npu/board/layout.py recognises the layouts; npu/board/m5stack.py reads M5Stack packages.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npu.text.chat_templates import find_chat_template

MANIFEST_NAME = "vlmd.toml"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
EMBEDDING_PATTERNS = ("*embed_tokens*.bin", "*embed_tokens*.npy", "*embed*.bin", "*embed*.npy")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
SAMPLING_FLAGS = (("temperature", "enable_temperature"), ("top_p", "enable_top_p_sampling"),
                  ("top_k", "enable_top_k_sampling"), ("repetition_penalty", "enable_repetition_penalty"))


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
    template: str | None = None  # a built-in template's name (config `template`, or the package's family)
    chat_template: str | None = None  # else the Jinja chat template the checkpoint carries
    template_source: str = ""
    image_context_id: int | None = None  # declared by the package, checked against the tokenizer
    post_topk: bool | None = None
    declared_cmm_kb: int | None = None  # M5Stack mode files' cmm_size (KiB of device memory the model takes)
    sampling: dict[str, Any] = field(default_factory=dict)  # GenerationOptions fields the package sets
    sampling_source: str = ""
    image_processor: dict[str, Any] = field(default_factory=dict)  # preprocessor_config.json, if any
    mode_params: dict[str, Any] = field(default_factory=dict)  # an M5Stack mode file's mode_param as given
    family: str = "internvl"  # the model family (npu/families/): told by graph names or config model_type
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


def read_json(path: Path, notes: list[str] | None = None) -> dict[str, Any] | None:
    """A JSON object file; None (and a note) for a 0-byte file, as AXERA's repos ship
    config.json for several models; LayoutError when it is not readable JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LayoutError(f"{path}: unreadable ({exc})") from exc
    if not text.strip():
        if notes is not None:
            notes.append(f"{path.name} in {path.parent} is empty (0 bytes): read as no config")
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LayoutError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise LayoutError(f"{path}: not a JSON object")
    return data


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def find_tokenizer_dir(root: Path, problems: list[str], hint: str | None = None) -> Path | None:
    """The tokenizer folder: `hint`, the directory itself, a *tokenizer* folder below or beside it."""
    candidates = [root / hint, root.parent / hint] if hint else []
    candidates.append(root)
    for base in (root, root.parent):
        if base.is_dir():
            candidates += sorted(p for p in base.iterdir() if p.is_dir() and "tokenizer" in p.name.lower())
    for directory in candidates:
        if directory.is_dir() and has_tokenizer(directory):
            return directory
    problems.append("no tokenizer files (tokenizer.json or vocab.json + merges.txt) here or in a *tokenizer* folder")
    return None


def config_dirs(root: Path, tokenizer_dir: Path | None) -> list[Path]:
    """Where a compiled package's config files may be: the model folder, its tokenizer
    folder, the folder above (an AXERA repository root)."""
    dirs = [root] + ([tokenizer_dir] if tokenizer_dir is not None else []) + [root.parent]
    return list(dict.fromkeys(dirs))


def find_config(dirs: list[Path], notes: list[str], problems: list[str]) -> dict[str, Any]:
    """The first usable config.json in `dirs` ({} when none): empty files are noted and skipped,
    unreadable ones are problems."""
    for directory in dirs:
        path = directory / "config.json"
        if path.is_file():
            try:
                config = read_json(path, notes)
            except LayoutError as exc:
                problems.append(str(exc))
                continue
            if config is not None:
                return config
    return {}


def find_embeddings(root: Path, problems: list[str]) -> Path | None:
    for pattern in EMBEDDING_PATTERNS:
        candidates = sorted(root.glob(pattern))
        if candidates:
            if len(candidates) > 1:
                problems.append(f"several embedding files {[p.name for p in candidates]}: name one in {MANIFEST_NAME}")
            return candidates[0]
    problems.append("no embedding file (model.embed_tokens.weight.bfloat16.bin or model.embed_tokens.weight.npy)")
    return None


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's section of a config.json (original, transformers-native or plain)."""
    return config.get("llm_config") or config.get("text_config") or config


def model_family(names: list[str]) -> tuple[str | None, str]:
    """The built-in template a package's names imply (the first name that says)."""
    for model_name in names:
        name = model_name.lower().replace("_", ".")
        if "internvl2.5" in name or "internvl3" in name:
            return "internvl2_5", f"assumed from the package name {model_name!r} (the InternVL2.5/3 family)"
        if "internvl2" in name or "intervl2" in name:
            return "Hermes-2", f"assumed from the package name {model_name!r} (the InternVL2 family)"
        if "qwen3-vl" in name.replace(".", "-"):  # StackFlow's tokenizer script: Qwen2 ChatML, its system text
            return "qwen2-chatml", (f"assumed from the package name {model_name!r} (StackFlow's tokenizer_qwen3-vl-*.py:"
                                    " ChatML, 'You are a helpful assistant.')")
    return None, "unknown: add config.json with `template`, or `template` in vlmd.toml"


@dataclass(frozen=True)
class TemplateChoice:
    template: str | None
    chat_template: str | None
    source: str


def choose_template(config: dict[str, Any], dirs: list[Path], family_names: list[str] | None) -> TemplateChoice:
    """The checkpoint's `template` field; else the Jinja chat template it carries; else, for
    board packages (`family_names` given), the family the package's names say; else none."""
    if config.get("template"):
        return TemplateChoice(str(config["template"]), None, "config.json")
    found = find_chat_template(dirs)
    if found is not None:
        return TemplateChoice(None, found[0], f"the checkpoint's chat template ({found[1]})")
    if family_names is None:
        return TemplateChoice(None, None, "none in config.json and no chat template: Qwen2 ChatML")
    family, source = model_family(family_names)
    return TemplateChoice(family, None, source)


def sampling_from(params: dict[str, Any]) -> dict[str, Any]:
    """GenerationOptions fields from StackFlow/ax-llm sampling keys (`enable_*` + value).

    As their LLMPostprocess applies them: without top-p or top-k sampling enabled the
    token is the argmax (greedy, temperature 0); top-p wins over top-k; temperature and
    repetition penalty only when enabled. Keys a package does not set are left out.
    """
    present = {name: params.get(flag) for name, flag in SAMPLING_FLAGS if flag in params}
    if not present:
        return {}
    sampling: dict[str, Any] = {}
    if present.get("top_p") and "top_p" in params:
        sampling.update(top_p=float(params["top_p"]), top_k=0)
    elif present.get("top_k") and "top_k" in params:
        sampling.update(top_k=int(params["top_k"]), top_p=1.0)
    if "top_p" in sampling or "top_k" in sampling:
        sampling["temperature"] = float(params["temperature"]) if present.get("temperature") else 1.0
    else:
        sampling["temperature"] = 0.0
    if present.get("repetition_penalty") and "repetition_penalty" in params:
        sampling["repetition_penalty"] = float(params["repetition_penalty"])
    return sampling


def find_post_config(dirs: list[Path], notes: list[str]) -> tuple[dict[str, Any], str]:
    """Sampling defaults from AXERA's post_config.json (ax-llm's runtime reads it), if shipped."""
    for directory in dirs:
        path = directory / "post_config.json"
        if path.is_file():
            try:
                params = read_json(path, notes) or {}
            except LayoutError as exc:
                notes.append(f"{exc}: sampling defaults not read")
                continue
            sampling = sampling_from(params)
            if sampling:
                return sampling, str(path)
    return {}, ""


def find_image_processor(dirs: list[Path]) -> dict[str, Any]:
    """The image processor config (transformers' preprocessor_config.json) a checkpoint carries."""
    for directory in dirs:
        for name in IMAGE_PROCESSOR_FILES:
            path = directory / name
            if path.is_file():
                try:
                    config = read_json(path)
                except LayoutError:
                    continue
                if config and any(key in config for key in ("resample", "image_mean", "image_std")):
                    return config
    return {}


def layer_name(template: str, index: int) -> str:
    """A layer file name from StackFlow's `template_filename_axmodel` (printf %d, or {})."""
    return template.replace("{}", str(index)) if "{}" in template else template % index


def script_model_id(script: Path) -> str | None:
    """The `--model_id` default a package's tokenizer script declares (the folder it loads)."""
    match = re.search(r"""['"]--model_id['"][^)]*?default\s*=\s*['"]([^'"]+)['"]""",
                      script.read_text(encoding="utf-8", errors="replace"))
    return match[1] if match else None


def family_from_names(*names: str | None) -> str:
    """The model family graph file names say: `qwen3_vl_text_*` layers are Qwen3-VL's (as
    Pulsar2's llm_build names them: StackFlow d9084ba mode_qwen3-vl-2B-Int4-*.json,
    AXERA-TECH/Qwen3-VL.AXERA 2e8db66 python/infer_image.py); a SmolVLM vision graph or
    package (`SmolVLM-256M-Instruct_vision_nhwc.axmodel`, `smolvlm-256M-ax630c`: StackFlow
    d9084ba mode_smolvlm-*.json; their layers are plain `llama_p128_l%d_together.axmodel`)
    is SmolVLM's; anything else InternVL."""
    if any(name and name.startswith("qwen3_vl") for name in names):
        return "qwen3_vl"
    return "smolvlm" if any(name and "smolvlm" in name.lower() for name in names) else "internvl"
