"""The zero-copy data path (npu/board/zero_copy.py, data_path.py) on the strict axengine stand-in.

Every test compares against the public path and the reference backend, or shows that a
fault (a skipped or short flush, a skipped invalidate, a missing private name, an
unknown pyaxengine) gives wrong tokens or the public path, never a silent pass.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types

import numpy as np
import pytest

from daemon.commands.demo import scenes
from npu.board.data_path import PublicPath
from npu.board.zero_copy import CACHE_LINE, CmmBuffer, ZeroCopyRuntime, ZeroCopySession
from npu.engine import Engine, EngineError, GenerationOptions, Prompt, TokenEvent
from npu.errors import ModelError
from npu.model import load_model
from tests.fixtures_board import BOARD_BUILD, build_board_dir
from tests.test_demo_board import DEMO_DIR

# The trained demo model: its answers vary token by token (a random tiny model repeats one
# token), so equal token lists mean equal logits and a corrupted path shows.
QUESTION = "Describe the image shortly."
GREEDY = GenerationOptions(max_tokens=12, ignore_stop=True)


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory) -> dict:
    if not (DEMO_DIR / "model.safetensors").is_file():
        pytest.skip(f"demo model not built at {DEMO_DIR} (python tools/train_demo_model.py)")
    root = tmp_path_factory.mktemp("demo-zero-copy")
    return {kind: build_board_dir(DEMO_DIR, root / kind, kind) for kind in ("axera", "m5stack")}


@pytest.fixture(scope="module")
def reference_model(demo_dirs):
    return load_model(DEMO_DIR, backend="reference", precision="bf16", **BOARD_BUILD)


@pytest.fixture
def axera_board_dir(demo_dirs):
    return demo_dirs["axera"]


@pytest.fixture
def fresh_board(tmp_path, demo_dirs):
    """A board directory of its own: new sessions, so a new data-path decision in this process."""
    def make(kind: str = "axera") -> object:
        return build_board_dir(DEMO_DIR, tmp_path / kind, kind)

    return make


def random_image(seed: int, *size) -> np.ndarray:
    return np.asarray(scenes.draw_scene(seed)[0])  # (240, 320, 3) uint8: a scene the demo model can describe


def token_ids(model, prompt: Prompt, options: GenerationOptions = GREEDY) -> list[int]:
    return [e.token_id for e in Engine(model).generate(prompt, options) if isinstance(e, TokenEvent)]


def image_prompt(seed: int = 3) -> Prompt:
    return Prompt(QUESTION, images=[random_image(seed, 180, 240)])


@pytest.mark.parametrize("kind", ["axera", "m5stack"])
def test_greedy_tokens_equal_the_public_path_and_the_reference(kind, axengine_standin, demo_dirs, reference_model):
    directory = demo_dirs[kind]
    zero_copy = load_model(directory, backend="axengine")
    public = load_model(directory, backend="axengine", data_path="public")
    assert isinstance(zero_copy.data_path, ZeroCopyRuntime) and isinstance(zero_copy.post, ZeroCopySession)
    assert isinstance(public.data_path, PublicPath) and not isinstance(public.post, ZeroCopySession)
    prompt = image_prompt()
    # a prompt of more than two chunks: group 1, the history group, then rows through the decode group
    assert Engine(zero_copy).count_prompt_tokens(prompt) > 2 * BOARD_BUILD["prefill_chunk"]
    want = token_ids(reference_model, prompt)
    assert len(set(want)) > 3
    assert token_ids(zero_copy, prompt) == want
    assert token_ids(public, prompt) == want  # the public path still right with the zero-copy pointers set


def test_follow_ups_and_sampling_equal_the_reference(axengine_standin, axera_board_dir, reference_model):
    board = load_model(axera_board_dir, backend="axengine")
    assert board.data_path.name == "zero-copy"
    sampled = GenerationOptions(max_tokens=6, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_stop=True)
    prompt = Prompt("Tell me a story about a cat and a lighthouse.")
    assert token_ids(board, prompt, sampled) == token_ids(reference_model, prompt, sampled)
    image, sides = random_image(5), []
    for model in (board, reference_model):  # the second question restores the KV prefix of the first
        engine = Engine(model)
        first = list(engine.generate(Prompt("Describe it.", [image], image_key="cam:1"), GenerationOptions(max_tokens=4)))
        second = list(engine.generate(Prompt("And the colours?", [image], image_key="cam:1"),
                                      GenerationOptions(max_tokens=6)))
        assert second[-1].timings["prefix_reused"] is True
        sides.append([e.token_id for e in first + second if isinstance(e, TokenEvent)])
    assert sides[0] == sides[1]


def test_the_kv_cache_is_the_layers_device_buffers(axengine_standin, axera_board_dir):
    board = load_model(axera_board_dir, backend="axengine")
    engine = Engine(board)
    runtime = board.data_path
    for layer, graph in enumerate(runtime.layers):
        assert np.shares_memory(engine.cache.keys[layer], graph.inputs["K_cache"].bytes)
        assert np.shares_memory(engine.cache.values[layer], graph.inputs["V_cache"].bytes)
    ios = [session.raw._sess._io[0] for session in board.layers]
    names = [spec.name for spec in board.layers[0].inputs(0)]
    outputs = [spec.name for spec in board.layers[0].outputs(0)]
    # layer 1 reads its input from layer 0's output buffer, and layer 0's mask and indices
    assert ios[1].pInputs[names.index("input")].phyAddr == ios[0].pOutputs[outputs.index("output")].phyAddr
    for name in ("mask", "indices"):
        assert ios[1].pInputs[names.index(name)].phyAddr == ios[0].pInputs[names.index(name)].phyAddr
    facts = runtime.describe()
    assert facts["chained_layers"] == len(board.layers) - 1 and facts["shared_mask_and_indices"] is True
    axengine_standin.STATS.reset()
    list(engine.generate(image_prompt(), GREEDY))
    pixels = int(np.prod(board.vision.inputs(0)[0].shape))
    assert axengine_standin.STATS.bytes_in == pixels  # only the image went through pyaxengine's run()
    assert axengine_standin.STATS.runs > 0


def test_device_traffic_counters_match_what_the_standin_saw(axengine_standin, axera_board_dir):
    from npu.board.traffic import model_traffic

    board = load_model(axera_board_dir, backend="axengine")
    engine = Engine(board)
    before, stats = model_traffic(board).copy(), axengine_standin.STATS
    stats.reset()
    list(engine.generate(image_prompt(), GREEDY))
    counted = model_traffic(board).minus(before)
    pixels = int(np.prod(board.vision.inputs(0)[0].shape))  # uint8 [1, H, W, 3]
    assert stats.bytes_in == pixels  # only the vision graph went through run(): its image, memmoved once
    assert counted.flushed == stats.bytes_flushed and counted.invalidated == stats.bytes_invalidated
    assert counted.written > pixels and stats.flush_calls > 0


FAULTS = {
    "skipped flush": ("flush", lambda original: lambda self, offset, nbytes: None),
    "short flush": ("flush", lambda original: lambda self, offset, nbytes:
                    original(self, offset, max(nbytes - CACHE_LINE, 0)) if nbytes > CACHE_LINE else None),
    "skipped invalidate": ("invalidate", lambda original: lambda self, offset, nbytes: None),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_the_standin_catches_a_missing_flush_or_invalidate(fault, axengine_standin, axera_board_dir,
                                                          reference_model, monkeypatch):
    board = load_model(axera_board_dir, backend="axengine")  # proven first, then broken
    assert board.data_path.name == "zero-copy"
    prompt = image_prompt()
    want = token_ids(reference_model, prompt)
    assert token_ids(board, prompt) == want
    method, make = FAULTS[fault]
    monkeypatch.setattr(CmmBuffer, method, make(getattr(CmmBuffer, method)))
    assert token_ids(board, prompt) != want


def test_the_self_check_refuses_a_path_that_skips_flushes(axengine_standin, fresh_board, monkeypatch, caplog):
    directory = fresh_board()
    monkeypatch.setattr(CmmBuffer, "flush", lambda self, offset, nbytes: None)
    with caplog.at_level(logging.INFO, logger="npu.board.data_path"):
        board = load_model(directory, backend="axengine")
        load_model(directory, backend="axengine")
    assert board.data_path.name == "public"
    assert "self-check against the public path failed" in board.data_path.reason
    assert "differ" in board.data_path.reason
    assert [r.getMessage() for r in caplog.records].count(f"board data path: public ({board.data_path.reason})") == 1
    with pytest.raises(ModelError, match="model.data_path = zero-copy, but it cannot run here: self-check"):
        load_model(directory, backend="axengine", data_path="zero-copy")


def test_a_missing_private_name_means_the_public_path(axengine_standin, fresh_board, monkeypatch, reference_model):
    axe = importlib.import_module("axengine._axe")
    renamed = types.SimpleNamespace(AXEngineSession=axe.AXEngineSession, engine_lib=axe.engine_lib,
                                    engine_cffi=axe.engine_cffi,
                                    sys_lib=types.SimpleNamespace(AX_SYS_MinvalidateCache=None))
    monkeypatch.setitem(sys.modules, "axengine._axe", renamed)  # what vlmd looks up; pyaxengine keeps its own
    board = load_model(fresh_board(), backend="axengine")
    assert board.data_path.describe() == {"data_path": "public",
                                          "reason": "axengine._axe.sys_lib lacks AX_SYS_MflushCache"}
    prompt = image_prompt(4)
    assert token_ids(board, prompt) == token_ids(reference_model, prompt)


def test_an_unknown_pyaxengine_version_means_the_public_path(axengine_standin, fresh_board, monkeypatch):
    import npu.board.pyaxengine as pyaxengine

    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if type(f).__name__ != "StandinFinder"])
    monkeypatch.setattr(pyaxengine, "_RUNTIME", None)  # read the (now absent) wheel metadata again
    board = load_model(fresh_board(), backend="axengine")
    assert board.data_path.name == "public"
    assert board.data_path.reason.startswith("pyaxengine of unknown version: vlmd reads the private buffers")


def test_pyaxengine_0_1_2_runs_both_paths(standin_release, fresh_board, reference_model):
    standin_release(VLMD_STANDIN_PYAXENGINE="0.1.2rc0")  # outputs are views its next run overwrites
    directory = fresh_board()
    prompt = image_prompt(6)
    want = token_ids(reference_model, prompt)
    board = load_model(directory, backend="axengine")
    assert board.data_path.name == "zero-copy"
    assert token_ids(board, prompt) == want
    assert token_ids(load_model(directory, backend="axengine", data_path="public"), prompt) == want


def test_a_second_engine_takes_the_device_buffers_over(axengine_standin, axera_board_dir):
    board = load_model(axera_board_dir, backend="axengine")
    first, second = Engine(board), Engine(board)
    list(second.generate(Prompt("Hi."), GenerationOptions(max_tokens=2)))
    with pytest.raises(EngineError, match="another Engine now holds this model's device buffers"):
        list(first.generate(Prompt("Hi."), GenerationOptions(max_tokens=2)))


def test_cmm_buffer_arithmetic_works_on_real_cffi_objects():
    """The calls vlmd makes through pyaxengine's cffi handles, on cffi itself (the stand-in only mimics it)."""
    cffi = pytest.importorskip("cffi")
    from npu.board.traffic import DeviceTraffic
    from npu.board.zero_copy import Libraries

    ffi = cffi.FFI()
    ffi.cdef("typedef struct { unsigned long long phyAddr; void *pVirAddr; unsigned int nSize; } BUFFER;")
    memory = ffi.new("char[]", 4096)
    entry = ffi.new("BUFFER *")
    base = int(ffi.cast("uintptr_t", memory))
    aligned = -(-base // 128) * 128
    entry.phyAddr, entry.pVirAddr, entry.nSize = 0x40000000, ffi.cast("void *", aligned), 1024
    calls = []

    class SysLib:
        def AX_SYS_MflushCache(self, phy, vir, size):
            calls.append(("flush", phy, int(ffi.cast("uintptr_t", ffi.cast("void *", vir))) - aligned, size))
            return 0

        def AX_SYS_MinvalidateCache(self, phy, vir, size):
            calls.append(("invalidate", phy, int(ffi.cast("uintptr_t", ffi.cast("void *", vir))) - aligned, size))
            return 0

    traffic = DeviceTraffic()
    buffer = CmmBuffer(entry[0], Libraries(SysLib(), None, ffi), traffic)
    rows = buffer.view(np.dtype(np.uint16), (8, 32))  # a numpy view of the cffi memory
    rows[1, 0] = 0xABCD
    assert ffi.buffer(memory)[aligned - base + 64:aligned - base + 66] == b"\xcd\xab"
    buffer.write(np.arange(3, dtype=np.uint16), offset=100)  # bytes 100..105: the line at 64
    buffer.invalidate(200, 300)  # lines 192..512
    assert calls == [("flush", 0x40000000 + 64, 64, 64), ("invalidate", 0x40000000 + 192, 192, 320)]
    assert (traffic.written, traffic.flushed, traffic.invalidated) == (6, 64, 320)
