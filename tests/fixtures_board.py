"""Board fixtures: the axengine stand-in, compiled-model directories as they ship, real boards.

- `axengine_standin`: makes `import axengine` (and its wheel metadata) find
  tests/axengine_standin/axengine for the test (its counters reset), on a board
  ($VLMD_AX_PROC points at `board_proc_dir`: the NPU is there, 3 GiB of CMM), and forgets
  it afterwards. `standin_release(**env)` imports a fresh stand-in emulating another
  pyaxengine release or board ($VLMD_STANDIN_PYAXENGINE, _NO_BF16, _LIBS, ...).
- `write_cmm_info(dir, total_kb, used_kb)`: a fake /proc/ax_proc with that mem_cmm_info.
- `graph_file(graph, **extra)`: one stand-in .axmodel of the tiny checkpoint.
- `build_board_dir(checkpoint, out, kind, ..., model_name=, mode_extra=)`: writes an AXERA
  llm_build-style or an M5Stack-style directory whose ".axmodel" files are stand-in JSON naming the checkpoint
  and graph, with the real embedding file (H1's exporter) and tokenizer files.
- `axera_board_dir`, `m5stack_board_dir`: those two, built once per session from the
  tiny native InternVL checkpoint (KV capacity 159, prefill chunk 32, one history group).
- `board_model_dir`: a real board's model directory from $VLMD_BOARD_MODEL_DIR with a
  real axengine; skips (with the reason) anywhere else. Tests using it are marked `board`.
- `real_axengine`: AXERA's own pyaxengine (its unmodified source, from $VLMD_PYAXENGINE_SRC
  or tests/vendor/pyaxengine) as `axengine`, over the fake libax_sys / libax_engine of
  tests/fake_board (compiled with gcc once per session: `fake_board`); skips with the
  reason where either is missing. `board_axengine` runs a test once on the stand-in and
  once on the real pyaxengine; `board_axengine.dir(d)` gives each its own copy of a
  session-scoped board directory (vlmd opens a graph file once per process, so a shared
  directory would hand the second one the first one's sessions).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fake_board.harness import FakeBoard, build, gcc, library_env

STANDIN_ROOT = Path(__file__).parent / "axengine_standin"
STANDIN_FORMAT = "vlmd-axengine-standin/1"
BOARD_ENV = "VLMD_BOARD_MODEL_DIR"
# Small shapes that still exercise every path: 64 image tokens + text > one 32-row chunk,
# a history group for the second chunk, the rest through decode.
BOARD_BUILD = dict(kv_capacity=159, prefill_chunk=32, history_groups=1)
M5STACK_MODEL = "internvl2-tiny-ax630c"


PYAXENGINE_ENV = "VLMD_PYAXENGINE_SRC"
VENDORED_PYAXENGINE = Path(__file__).parent / "vendor" / "pyaxengine"
FAKE_BOARD_ENV = ("VLMD_FAKE_BOARD_VNPU", "VLMD_FAKE_BOARD_NO_BF16")

STANDIN_ENV = ("VLMD_STANDIN_PROVIDERS", "VLMD_STANDIN_LIBS", "VLMD_STANDIN_AXCL_HOST", "VLMD_STANDIN_PYAXENGINE",
               "VLMD_STANDIN_NO_BF16", "VLMD_STANDIN_ENGINE_VERSION")


def _import_standin():
    """Import the stand-in afresh (as the environment says), leaving sys.modules and sys.meta_path as they were."""
    saved = {name: mod for name, mod in sys.modules.items() if name == "axengine" or name.startswith("axengine.")}
    for name in saved:
        del sys.modules[name]
    finders = list(sys.meta_path)
    sys.path.insert(0, str(STANDIN_ROOT))
    try:
        module = importlib.import_module("axengine")
    finally:
        sys.path.remove(str(STANDIN_ROOT))
        sys.meta_path[:] = finders  # the stand-in's metadata finder is installed per test (use_standin)
    loaded = {name: mod for name, mod in sys.modules.items() if name == "axengine" or name.startswith("axengine.")}
    for name in loaded:
        del sys.modules[name]
    sys.modules.update(saved)
    return module, loaded


def use_standin(monkeypatch, imported) -> object:
    """Make `import axengine` (and its wheel metadata) resolve to an imported stand-in for this test."""
    module, modules = imported
    for name in [n for n in sys.modules if (n == "axengine" or n.startswith("axengine.")) and n not in modules]:
        monkeypatch.delitem(sys.modules, name)  # a submodule another stand-in imported lazily (its _axe)
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    others = [finder for finder in sys.meta_path if type(finder).__name__ != "StandinFinder"]
    monkeypatch.setattr(sys, "meta_path", [*others, modules["axengine._metadata"].FINDER])
    module.STATS.reset()
    return module


@pytest.fixture(scope="session")
def _standin_modules():
    """The stand-in imported once (its reference-graph cache lives for the session), kept out of sys.modules."""
    saved = {name: os.environ.pop(name) for name in STANDIN_ENV if name in os.environ}
    try:
        return _import_standin()
    finally:
        os.environ.update(saved)


# The totals line of /proc/ax_proc/mem_cmm_info as the AXERA kernel writes it (format read by
# StackFlow's parsers); the lines above it list partitions and blocks and are not parsed.
# The totals line of /proc/ax_proc/mem_cmm_info in the format StackFlow's parsers read (a real
# file lists partitions and blocks above it; vlmd, like StackFlow, reads only this line).
CMM_INFO_TEMPLATE = (" total size={total}KB({total_mb}MB),used={used}KB({used_mb}MB + 0KB),"
                     "remain={remain}KB({remain_mb}MB + 0KB),partition_number=1,block_number=13\n")


def write_cmm_info(directory: Path, total_kb: int, used_kb: int) -> Path:
    """A fake /proc/ax_proc (point $VLMD_AX_PROC at it) whose mem_cmm_info reports these totals."""
    directory.mkdir(parents=True, exist_ok=True)
    remain = total_kb - used_kb
    (directory / "mem_cmm_info").write_text(CMM_INFO_TEMPLATE.format(
        total=total_kb, total_mb=total_kb // 1024, used=used_kb, used_mb=used_kb // 1024, remain=remain,
        remain_mb=remain // 1024))
    return directory


@pytest.fixture(scope="session")
def board_proc_dir(tmp_path_factory) -> Path:
    """A board's /proc/ax_proc with 3 GiB of CMM, 18 MiB used."""
    return write_cmm_info(tmp_path_factory.mktemp("ax_proc"), 3 * 1024 * 1024, 18876)


@pytest.fixture
def axengine_standin(_standin_modules, board_proc_dir, monkeypatch):
    """The stand-in as the current pyaxengine (0.1.3.rc3) on a board: NPU present, CMM plentiful."""
    for name in STANDIN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLMD_AX_PROC", str(board_proc_dir))
    return use_standin(monkeypatch, _standin_modules)


@pytest.fixture
def standin_release(monkeypatch, board_proc_dir):
    """A factory: `standin_release(VLMD_STANDIN_PYAXENGINE="0.1.1rc0", ...)` imports a stand-in emulating that wheel."""
    def make(**env: str):
        for name in STANDIN_ENV:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("VLMD_AX_PROC", str(board_proc_dir))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return use_standin(monkeypatch, _import_standin())

    return make


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
                    post_topk: int = 0, model_name: str = M5STACK_MODEL, mode_extra: dict | None = None) -> Path:
    """A compiled-model directory of `kind` ("axera" or "m5stack") under `out`; returns the model folder.

    M5Stack packages are named `model_name`; `mode_extra` adds mode_param keys (e.g. cmm_size)."""
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
    model_dir = out / "data" / model_name
    names = _write_graphs(checkpoint, model_dir, precision, build, post_topk)
    _copy_tokenizer(checkpoint, model_dir / "internvl2_tokenizer", with_config=False)
    config = json.loads((checkpoint / "config.json").read_text())
    text = config.get("llm_config") or config.get("text_config") or config
    mode = {"mode": model_name, "type": "vlm", "capabilities": ["text_generation", "chat"], "mode_param": {
        "tokenizer_type": 2, "filename_tokenizer_model": "http://localhost:8080",
        "filename_tokens_embed": names["embed"], "filename_post_axmodel": names["post"],
        "template_filename_axmodel": names["layers"], "filename_vpm_resampler_axmodedl": names["vision"],
        "b_use_topk": bool(post_topk), "b_bos": False, "b_eos": False, "axmodel_num": _n_layers(config),
        "tokens_embed_num": text["vocab_size"], "img_token_id": config.get("image_token_id") or config.get("img_context_token_id") or 151648, "tokens_embed_size": text["hidden_size"],
        "b_use_mmap_load_embed": True, "ext_scripts": [f"tokenizer_{model_name}.py"], **(mode_extra or {})}}
    if not (model_dir / names["vision"]).is_file():
        del mode["mode_param"]["filename_vpm_resampler_axmodedl"]
    (out / "data" / "models").mkdir(parents=True, exist_ok=True)
    (out / "data" / "models" / f"mode_{model_name}.json").write_text(json.dumps(mode, indent=4))
    (out / "scripts").mkdir(exist_ok=True)
    (out / "scripts" / f"tokenizer_{model_name}.py").write_text(
        "import argparse\nargs = argparse.ArgumentParser()\n"
        "args.add_argument('--model_id', type=str, default='internvl2_tokenizer')\n"
    )
    return model_dir


@pytest.fixture
def graph_file(tiny_internvl_native, tmp_path):
    """`graph_file("layer0", **extra)`: one stand-in .axmodel of the tiny checkpoint (BOARD_BUILD shapes)."""
    def write(graph: str, **extra) -> str:
        path = tmp_path / f"{graph}.axmodel"
        _write_graph(path, tiny_internvl_native.path.resolve(), graph, "bf16", BOARD_BUILD, **extra)
        return str(path)

    return write


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


# ------------------------------------------------------------------ the real pyaxengine over fake libraries


def pyaxengine_source() -> Path | None:
    """A directory holding AXERA's `axengine/` package and its setup.py, or None."""
    for candidate in (os.environ.get(PYAXENGINE_ENV), VENDORED_PYAXENGINE):
        if candidate and (Path(candidate) / "axengine" / "_axe_capi.py").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def fake_board(tmp_path_factory) -> FakeBoard:
    """tests/fake_board's libraries, compiled and loaded once per session (skips without gcc)."""
    if gcc() is None:
        pytest.skip("the fake board libraries need gcc (.ci/run installs it)")
    return FakeBoard(build(tmp_path_factory.mktemp("fake_board_libs")))


def _site_dir(source: Path, site: Path) -> Path:
    """`axengine` as pip would install it: the package and its dist-info (version from setup.py)."""
    match = re.search(r"version\s*=\s*[\"']([^\"']+)[\"']", (source / "setup.py").read_text())
    if match is None:
        raise RuntimeError(f"{source / 'setup.py'} names no version")
    (site / "axengine").symlink_to(source / "axengine", target_is_directory=True)
    info = site / f"axengine-{match[1]}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: axengine\nVersion: {match[1]}\n")
    return site


def _forget_axengine() -> dict:
    saved = {n: m for n, m in sys.modules.items() if n == "axengine" or n.startswith("axengine.")}
    for name in saved:
        del sys.modules[name]
    return saved


@pytest.fixture(scope="session")
def _real_axengine_modules(fake_board, tmp_path_factory):
    """The real package imported once over the fakes, kept out of sys.modules between tests."""
    source = pyaxengine_source()
    if source is None:
        pytest.skip(f"the real pyaxengine is not here: set {PYAXENGINE_ENV} to a checkout of AXERA-TECH/pyaxengine"
                    " (tested at 3554448, 0.1.3.rc3)")
    site = _site_dir(source, tmp_path_factory.mktemp("pyaxengine_site"))
    saved_env = {name: os.environ.get(name) for name in (*library_env(fake_board.dir), *STANDIN_ENV, *FAKE_BOARD_ENV)}
    saved_modules = _forget_axengine()
    os.environ.update(library_env(fake_board.dir))
    for name in (*STANDIN_ENV, *FAKE_BOARD_ENV):
        os.environ.pop(name, None)
    sys.path.insert(0, str(site))
    try:
        module = importlib.import_module("axengine")
    finally:
        sys.path.remove(str(site))
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        loaded = _forget_axengine()
        sys.modules.update(saved_modules)
    return module, loaded, site


@pytest.fixture
def real_axengine(_real_axengine_modules, fake_board, board_proc_dir, monkeypatch):
    """AXERA's pyaxengine as `axengine` for this test, on a board (the fakes), fresh NPU settings.

    Submodules it imports during the test (`axengine._axe`, on the first session: dlopen
    and AX_ENGINE_Init, once per process as on a board) are kept for the later tests.
    Fails the test if a fake library callback raised."""
    module, loaded, site = _real_axengine_modules
    for name in (*STANDIN_ENV, *FAKE_BOARD_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in library_env(fake_board.dir).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VLMD_AX_PROC", str(board_proc_dir))
    for name in [n for n in sys.modules if (n == "axengine" or n.startswith("axengine.")) and n not in loaded]:
        monkeypatch.delitem(sys.modules, name)
    for name, mod in loaded.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if type(f).__name__ != "StandinFinder"])
    monkeypatch.syspath_prepend(str(site))  # its dist-info: importlib.metadata.version("axengine")
    fake_board.take_errors()
    yield module
    imported = {n: m for n, m in sys.modules.items() if n.startswith("axengine.") and n not in loaded
                and "axengine_standin" not in str(getattr(m, "__file__", ""))}
    loaded.update(imported)
    for name in imported:  # kept for the next test that takes the real package, not left behind
        del sys.modules[name]
    errors = fake_board.take_errors()
    assert not errors, f"the fake board's callbacks raised: {errors!r}"


@dataclass
class BoardAxengine:
    """Which axengine a test runs on, and a board directory of its own for it."""

    name: str  # "standin" or "pyaxengine"
    module: Any
    fake: FakeBoard | None
    copies: dict = field(default_factory=dict)
    root: Path | None = None

    def dir(self, model_dir: Path) -> Path:
        """`model_dir` for the stand-in; for the real pyaxengine a copy of its package, made once."""
        if self.name == "standin":
            return model_dir
        key = str(model_dir)
        if key not in self.copies:
            # an M5Stack package is <root>/data/<model>; an AXERA one <root>/<name>_axmodel
            top = model_dir.parent.parent if model_dir.parent.name == "data" else model_dir.parent
            target = self.root / f"copy{len(self.copies)}"
            shutil.copytree(top, target, symlinks=True)
            self.copies[key] = target / model_dir.relative_to(top)
        return self.copies[key]


@pytest.fixture(scope="session")
def _board_copies(tmp_path_factory) -> tuple[dict, Path]:
    return {}, tmp_path_factory.mktemp("board_copies")


@pytest.fixture(params=["standin", "pyaxengine"])
def board_axengine(request, _board_copies) -> BoardAxengine:
    """The test once on the Python stand-in, once on AXERA's pyaxengine over the fake libraries."""
    copies, root = _board_copies
    if request.param == "standin":
        return BoardAxengine("standin", request.getfixturevalue("axengine_standin"), None)
    module = request.getfixturevalue("real_axengine")
    return BoardAxengine("pyaxengine", module, request.getfixturevalue("fake_board"), copies, root)
