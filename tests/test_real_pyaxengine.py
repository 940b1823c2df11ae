"""What AXERA's own pyaxengine does that its stand-in did not show, and how vlmd handles each.

Run through pyaxengine's unmodified source over the fake board libraries (tests/fake_board;
skips without gcc or without the source, see tests/fixtures_board.py). Each case is a
difference issue 24 lists: a full-core model in virtual-NPU mode, C arrays without bounds,
cffi's OverflowError in a flush, unknown input names, an empty model file.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from npu.board.axengine_session import AxEngineSession, AxEngineUnsupported
from npu.board.zero_copy import CmmBuffer
from npu.errors import ModelError
from npu.model import load_model
from npu.session import SessionError
from tests.fixtures_board import STANDIN_FORMAT, build_board_dir
from tests.test_zero_copy import DEMO_DIR, demo_dirs, image_prompt, reference_model, token_ids  # noqa: F401


def _with(path: str, **extra) -> str:
    spec = json.loads(Path(path).read_text())
    Path(path).write_text(json.dumps({**spec, **extra}))
    return path


def test_a_full_core_model_in_vnpu_mode_is_explained(real_axengine, graph_file, monkeypatch):
    importlib.import_module("axengine._axe")  # this process initialised the NPU first (VNPU disabled) ...
    monkeypatch.setenv("VLMD_FAKE_BOARD_VNPU", "1")  # ... now another program runs it as a virtual NPU
    with pytest.raises(AxEngineUnsupported) as caught:
        AxEngineSession(graph_file("post"))
    message = str(caught.value)
    assert "the NPU was initialised in virtual-NPU mode (ENABLED) by another program on this board" in message
    assert "a full-core model cannot run in that mode" in message
    assert "stop the other NPU users" in message and "half-core on AX630C" in message
    assert "is not allowed when vnpu is inited as VNPUType.ENABLED" in message  # pyaxengine's own words kept
    # a half-core build runs beside it
    session = AxEngineSession(_with(graph_file("layer0"), model_type=0))
    assert session.num_groups == 3


class _ExtraInputInGroup1:
    """A graph whose group 1 has one input more than group 0."""

    name, num_groups = "odd", 2

    def __init__(self, graphs) -> None:
        spec = graphs.GraphSpec
        f32 = np.dtype(np.float32)
        self._inputs = [[spec("a", (1, 4), f32)], [spec("a", (1, 4), f32), spec("b", (1, 4), f32)]]
        self._outputs = [[spec("y", (1, 4), f32)], [spec("y", (1, 4), f32)]]

    def inputs(self, group: int = 0):
        return list(self._inputs[group])

    def outputs(self, group: int = 0):
        return list(self._outputs[group])

    def run(self, feed: dict, group: int = 0) -> list[np.ndarray]:
        return [sum(feed.values())]


def test_a_group_with_more_inputs_than_pyaxengines_arrays_is_refused(real_axengine, fake_board, tmp_path):
    fake_board.graphs["odd"] = _ExtraInputInGroup1(fake_board._graphs_module)
    path = tmp_path / "odd.axmodel"
    path.write_text(json.dumps({"format": STANDIN_FORMAT, "test_graph": "odd"}))
    raw = real_axengine.InferenceSession(str(path))
    assert int(raw._sess._io[0].nInputSize) == 1  # pyaxengine sized pInputs by group 0 only
    with pytest.raises(AxEngineUnsupported, match="shape group 1 has 2 inputs, group 0 has 1: pyaxengine"):
        AxEngineSession(path)


def test_a_flush_outside_its_buffer_is_refused_before_cffi(real_axengine, graph_file):
    """cffi raises OverflowError for AX_U32 sizes < 0 or >= 2**32; vlmd checks the range itself."""
    from npu.board.traffic import DeviceTraffic
    from npu.board.zero_copy import find_libraries

    session = AxEngineSession(graph_file("post"))
    libs = find_libraries(real_axengine)
    buffer = CmmBuffer(session.raw._sess._io[0].pInputs[0], libs, DeviceTraffic())
    buffer.flush(0, buffer.size)
    for offset, nbytes in ((buffer.size + 64, 1), (0, buffer.size + 1), (0, -5), (-128, 64), (0, 2**32)):
        with pytest.raises(SessionError, match="outside the"):
            buffer.flush(offset, nbytes)
        with pytest.raises(SessionError, match="outside the"):
            buffer.invalidate(offset, nbytes)


def test_a_cache_range_gone_wrong_makes_the_path_step_aside_not_crash(real_axengine, demo_dirs, tmp_path,
                                                                      monkeypatch, reference_model):
    prompt = image_prompt(4)
    want = token_ids(reference_model, prompt)
    # a range computation gone wrong (a negative size): refused by vlmd's own check, with the range named
    with monkeypatch.context() as patch:
        patch.setattr(CmmBuffer, "_span", lambda self, offset, nbytes: (0, -1))
        board = load_model(build_board_dir(DEMO_DIR, tmp_path / "a", "axera"), backend="axengine")
    assert board.data_path.name == "public"
    assert "is outside the" in board.data_path.reason and "-byte buffer at 0x" in board.data_path.reason
    assert token_ids(board, prompt) == want
    # and should a library call still get a value outside its C type, cffi's OverflowError is a reason too
    with monkeypatch.context() as patch:
        patch.setattr(CmmBuffer, "flush", lambda self, offset, nbytes:
                      self._libs.sys_lib.AX_SYS_MflushCache(self.phys, self._base, -1))
        board = load_model(build_board_dir(DEMO_DIR, tmp_path / "b", "axera"), backend="axengine")
    assert board.data_path.name == "public"
    assert board.data_path.reason.startswith("OverflowError: ")
    assert token_ids(board, prompt) == want


def test_unknown_input_names_are_refused_by_vlmd_not_ignored(real_axengine, graph_file):
    session = AxEngineSession(graph_file("post"))
    spec = session.inputs(0)[0]
    feed = {spec.name: np.ones(spec.shape, spec.dtype)}
    want = session.run(feed, 0)[0]
    # pyaxengine itself runs the feed and drops the name it does not know
    extra = dict(feed, hidden_states=np.zeros(spec.shape, spec.dtype))
    assert np.array_equal(session.raw.run(None, extra)[0], want)
    with pytest.raises(SessionError, match=r"unexpected inputs \['hidden_states'\]"):
        session.run(extra, 0)


def test_an_empty_model_file_is_named(real_axengine, tiny_internvl_native, tmp_path):
    directory = build_board_dir(tiny_internvl_native.path, tmp_path / "board", "axera")
    empty = directory / "qwen2_p32_l1_together.axmodel"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot mmap an empty file"):  # what pyaxengine says
        real_axengine.InferenceSession(str(empty))
    with pytest.raises(ModelError) as caught:
        load_model(directory, backend="axengine")
    assert f"{empty} is empty (0 bytes)" in str(caught.value)


def test_a_libax_engine_without_bf16_is_explained(real_axengine, tiny_internvl_native, tmp_path, monkeypatch):
    """The fake engine reports bf16 as AX_ENGINE_DT_UNKNOWN, as libax_engine before AX620E SDK 3.12 does."""
    directory = build_board_dir(tiny_internvl_native.path, tmp_path / "board", "axera")
    monkeypatch.setenv("VLMD_FAKE_BOARD_NO_BF16", "1")
    with pytest.raises(ModelError) as caught:
        load_model(directory, backend="axengine")
    message = str(caught.value)
    assert "cannot report bf16 tensors (pyaxengine: Unsupported data type" in message  # pyaxengine's own error
    assert "AX620E SDK >= 3.12" in message


def test_an_io_struct_that_disagrees_with_the_graph_is_not_indexed(real_axengine, tiny_internvl_native, tmp_path):
    """vlmd reads pInputs[i] only for i below pyaxengine's own count: past it is other memory, not an IndexError."""
    from npu.board.data_path import select_data_path

    model = load_model(build_board_dir(tiny_internvl_native.path, tmp_path / "board", "axera"), backend="axengine",
                       data_path="public")
    io = model.layers[1].raw._sess._io[0]
    io.nInputSize -= 1
    try:
        path = select_data_path(model.layers, model.post, model.shapes(), "auto")
    finally:
        io.nInputSize += 1
    assert path.name == "public"
    assert path.reason == "layer1: pyaxengine's IO struct has 4 inputs, the graph 5"
