"""The axengine stand-in behaves as pyaxengine's source says (AXERA-TECH/pyaxengine 3554448 and older tags).

If the stand-in drifted from the real package, every board test would prove only our
reading of it; these tests pin the behaviours vlmd depends on or guards against.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect

import numpy as np
import pytest

from npu.reference import build_reference_sessions
from npu.session import BF16
from tests.fixtures_board import BOARD_BUILD


def zeros_feed(raw, group: int = 0) -> dict[str, np.ndarray]:
    return {n.name: np.zeros(n.shape, n.dtype) for n in raw.get_inputs(group)}


def nbytes(node) -> int:
    return int(np.prod(node.shape)) * np.dtype(node.dtype).itemsize


def test_shapes_are_lists_and_dtypes_numpy_on_both_providers(axengine_standin, graph_file, monkeypatch):
    board = axengine_standin.InferenceSession(graph_file("layer0"))
    monkeypatch.setenv("VLMD_STANDIN_PROVIDERS", "AXCLRTExecutionProvider")
    card = axengine_standin.InferenceSession(graph_file("layer0"), providers="AXCLRTExecutionProvider")
    for raw in (board, card):
        node = raw.get_inputs(0)[0]
        assert isinstance(node.shape, list) and node.shape == [1, 159, 32]
        assert node.dtype == BF16 and isinstance(node.dtype, np.dtype)


def test_one_cmm_buffer_per_input_index_sized_for_the_largest_group(axengine_standin, graph_file):
    raw = axengine_standin.InferenceSession(graph_file("layer0"))
    io = raw._sess._io[0]
    groups = range(raw._sess._shape_count)
    assert raw._sess._shape_count == 3 and io.nInputSize == len(io.pInputs) == 5
    for i, buffer in enumerate(io.pInputs):
        assert buffer.nSize == max(nbytes(raw.get_inputs(g)[i]) for g in groups)
    names = [n.name for n in raw.get_inputs(0)]
    k_cache = io.pInputs[names.index("K_cache")]
    assert k_cache.nSize == 159 * 32 * 2  # the decode group's cache; the prefill groups use its first rows
    assert len({b.phyAddr for b in io.pInputs + io.pOutputs}) == 8  # distinct buffers


def test_run_flushes_and_invalidates_whole_buffers(axengine_standin, graph_file):
    raw = axengine_standin.InferenceSession(graph_file("layer0"))
    io, stats = raw._sess._io[0], axengine_standin.STATS
    stats.reset()
    feed = zeros_feed(raw, 1)  # the first-chunk group: small K/V placeholders
    raw.run(None, feed, shape_group=1)
    assert stats.bytes_in == sum(a.nbytes for a in feed.values())
    assert stats.bytes_flushed == sum(b.nSize for b in io.pInputs)  # whole buffers, not the bytes fed
    assert stats.bytes_invalidated == sum(b.nSize for b in io.pOutputs)


def test_a_subset_of_output_names_fails_on_the_current_release(axengine_standin, graph_file):
    raw = axengine_standin.InferenceSession(graph_file("layer0"))
    feed = zeros_feed(raw)
    with pytest.raises(ValueError):  # output_names.index(...) of a name not asked for (108722c)
        raw.run(["output"], feed)
    names = [n.name for n in raw.get_outputs(0)]
    shapes = [a.shape for a in raw.run([names[1], names[2], names[0]], feed)]
    honoured = [tuple(raw.get_outputs(0)[i].shape) for i in (1, 2, 0)]
    assert shapes != honoured  # a permuted list returns the wrong tensors: vlmd always passes None


def test_an_older_release_honours_a_subset_of_output_names(standin_release, graph_file):
    axengine = standin_release(VLMD_STANDIN_PYAXENGINE="0.1.3.rc2")
    raw = axengine.InferenceSession(graph_file("layer0"))
    (only,) = raw.run(["output"], zeros_feed(raw))
    assert list(only.shape) == raw.get_outputs(0)[2].shape


def test_info_lines_go_to_stdout_on_import_and_per_session(standin_release, graph_file, capsys):
    axengine = standin_release()
    assert "[INFO] Available providers:  ['AxEngineExecutionProvider']" in capsys.readouterr().out
    axengine.InferenceSession(graph_file("post"))
    out = capsys.readouterr().out
    for line in ("[INFO] Using provider: AxEngineExecutionProvider", "[INFO] Chip type: ChipType.MC20E",
                 "[INFO] Engine version: 2.12.0s", "[INFO] Model type: 1 (full core)", "[INFO] Compiler version"):
        assert line in out


def test_version_only_in_the_wheel_metadata(axengine_standin, standin_release):
    assert importlib.metadata.version("axengine") == "0.1.3"
    assert not hasattr(axengine_standin, "__version__")
    standin_release(VLMD_STANDIN_PYAXENGINE="0.1.2rc0")
    assert importlib.metadata.version("axengine") == "0.1.2"


def test_0_1_1_has_no_shape_group_on_run(standin_release, graph_file):
    axengine = standin_release(VLMD_STANDIN_PYAXENGINE="0.1.1rc0")
    assert "shape_group" not in inspect.signature(axengine.InferenceSession.run).parameters
    raw = axengine.InferenceSession(graph_file("layer0"))
    assert len(raw.get_inputs(1)) == 5  # groups are listed, but cannot be run
    with pytest.raises(TypeError):
        raw.run(None, zeros_feed(raw, 1), shape_group=1)


def test_0_1_2_returns_views_the_next_run_overwrites(standin_release, graph_file):
    axengine = standin_release(VLMD_STANDIN_PYAXENGINE="0.1.2rc0")
    raw = axengine.InferenceSession(graph_file("post"))
    first = raw.run(None, {"input": np.ones((1, 1, 64), BF16)})[0]
    kept = first.copy()
    raw.run(None, {"input": -np.ones((1, 1, 64), BF16)})
    assert not np.array_equal(first.view(np.uint16), kept.view(np.uint16))


def test_a_libax_engine_without_bf16_fails_at_session_creation(standin_release, graph_file):
    axengine = standin_release(VLMD_STANDIN_NO_BF16="1")
    with pytest.raises(ValueError, match=r"Unsupported data type '0'\."):
        axengine.InferenceSession(graph_file("post"))


@pytest.mark.parametrize("release, pcie_host, expected", [
    ("0.1.3.rc3", "0", ["AxEngineExecutionProvider", "AXCLRTExecutionProvider"]),
    ("0.1.3.rc3", "1", ["AXCLRTExecutionProvider", "AxEngineExecutionProvider"]),
    ("0.1.3.rc2", "0", ["AXCLRTExecutionProvider", "AxEngineExecutionProvider"]),
])
def test_provider_order_follows_the_release(standin_release, release, pcie_host, expected):
    axengine = standin_release(VLMD_STANDIN_PYAXENGINE=release, VLMD_STANDIN_LIBS="ax_engine,axcl_rt",
                               VLMD_STANDIN_AXCL_HOST=pcie_host)
    assert axengine.get_available_providers() == expected


def test_no_provider_no_import(standin_release):
    with pytest.raises(ImportError, match="No providers found"):
        standin_release(VLMD_STANDIN_LIBS="")


def test_only_a_flush_moves_host_bytes_to_the_npu(axengine_standin, graph_file, tiny_internvl_native):
    """The device copy is separate: an input written without its flush is not what the graph reads."""
    raw = axengine_standin.InferenceSession(graph_file("post"))
    sess, capi = raw._sess, importlib.import_module("axengine._axe_capi")
    ffi, sys_lib, engine_lib = capi.engine_cffi, capi.sys_lib, capi.engine_lib
    inp, out = sess._io[0].pInputs[0], sess._io[0].pOutputs[0]
    host_in = np.frombuffer(ffi.buffer(inp.pVirAddr, inp.nSize), np.uint8).view(BF16)  # (64,) host mapping
    host_out = np.frombuffer(ffi.buffer(out.pVirAddr, out.nSize), np.uint8).view(BF16)
    row = np.random.default_rng(0).standard_normal(64).astype(BF16)
    reference = build_reference_sessions(tiny_internvl_native.path, precision="bf16", **BOARD_BUILD).post
    want = np.array(reference.run({"input": row.reshape(1, 1, 64)}, 0)[0]).reshape(-1)

    def npu_result(flush: bool, invalidate: bool) -> np.ndarray:
        host_in[:] = row
        if flush:
            assert sys_lib.AX_SYS_MflushCache(inp.phyAddr, inp.pVirAddr, inp.nSize) == 0
        host_out[:] = 0
        assert sys_lib.AX_SYS_MflushCache(out.phyAddr, out.pVirAddr, out.nSize) == 0
        assert engine_lib.AX_ENGINE_RunSyncV2(sess._handle[0], sess._context[0], sess._io) == 0
        if invalidate:
            assert sys_lib.AX_SYS_MinvalidateCache(out.phyAddr, out.pVirAddr, out.nSize) == 0
        return host_out.copy()

    np.testing.assert_array_equal(npu_result(True, True).view(np.uint16), want.view(np.uint16))
    host_in[:] = 0  # the device still holds `row`: re-flush zeros so the next run sees stale input
    sys_lib.AX_SYS_MflushCache(inp.phyAddr, inp.pVirAddr, inp.nSize)
    assert not np.array_equal(npu_result(False, True).view(np.uint16), want.view(np.uint16))
    assert not np.any(npu_result(True, False).view(np.uint16))  # the host still sees its own zeros
    # Cache maintenance must name one place: a vir that is not the phy's mapping fails.
    assert sys_lib.AX_SYS_MflushCache(inp.phyAddr, out.pVirAddr, 64) != 0


def test_a_buffer_smaller_than_its_group_needs_fails_the_run(axengine_standin, graph_file):
    raw = axengine_standin.InferenceSession(graph_file("post"))
    sess = raw._sess
    sess._io[0].pInputs[0].nSize = 2  # smaller than the group's tensor: the run fails, as the engine would
    assert raw.get_inputs(0)[0].shape == [1, 1, 64]
    with pytest.raises(RuntimeError, match="Failed to run model"):
        raw.run(None, {"input": np.zeros((1, 1, 64), BF16)})
