"""The fake board libraries (tests/fake_board) are as strict as the tests need them to be.

They are what AXERA's pyaxengine runs on in these tests: their structs must be laid out as
pyaxengine's cffi declares them, their CMM must keep the host and device copies apart, and
their engine must refuse what it cannot run; otherwise the tests through pyaxengine prove
nothing. Skips without gcc or without pyaxengine's source (tests/fixtures_board.py).
"""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest

from npu.reference import build_reference_sessions
from tests.fixtures_board import BOARD_BUILD, STANDIN_FORMAT

STRUCTS = ("AX_ENGINE_NPU_ATTR_T", "AX_ENGINE_IO_META_EX_T", "AX_ENGINE_HANDLE_EXTRA_T", "AX_ENGINE_CMM_INFO_T",
           "AX_ENGINE_IO_SETTING_T", "AX_ENGINE_IO_META_T", "AX_ENGINE_IO_INFO_T", "AX_ENGINE_IO_BUFFER_T",
           "AX_ENGINE_IO_T")
FIELDS = {"AX_ENGINE_HANDLE_EXTRA_T": ["pName"],
          "AX_ENGINE_IO_META_T": ["pShape", "nShapeSize", "eLayout", "eDataType", "pExtraMeta", "nSize", "pStride",
                                  "u64Reserved"],
          "AX_ENGINE_IO_INFO_T": ["nInputSize", "pOutputs", "nOutputSize", "bDynamicBatchSize", "u64Reserved"],
          "AX_ENGINE_IO_BUFFER_T": ["pVirAddr", "nSize", "pStride", "nStrideSize", "u64Reserved"],
          "AX_ENGINE_IO_T": ["nInputSize", "pOutputs", "nOutputSize", "nBatchSize", "pIoSetting", "u64Reserved"]}


@pytest.fixture(scope="module")
def reference_graphs(tiny_internvl_native):
    return build_reference_sessions(tiny_internvl_native.path, precision="bf16", **BOARD_BUILD)


@pytest.fixture
def capi(real_axengine):
    from axengine import _axe_capi  # the real module: cdef and dlopen of the fakes

    return _axe_capi


def test_struct_layouts_are_pyaxengines(capi, fake_board):
    ffi = capi.engine_cffi
    for name in STRUCTS:
        assert fake_board.layout(name) == ffi.sizeof(name), name
    for name, members in FIELDS.items():
        for member in members:
            assert fake_board.layout(f"{name}.{member}") == ffi.offsetof(name, member), f"{name}.{member}"


def test_pyaxengine_loaded_the_fakes_by_their_library_names(capi, fake_board):
    import axengine

    assert axengine.get_available_providers() == ["AxEngineExecutionProvider"]
    assert capi.sys_path == "libax_sys.so" and capi.engine_path == "libax_engine.so"  # find_library's answer
    assert capi.engine_cffi.string(capi.engine_lib.AX_ENGINE_GetVersion()) == b"0.0.0 fake (vlmd tests)"


def test_cmm_moves_bytes_only_on_flush_and_invalidate(fake_board):
    """Through ctypes, so it runs wherever gcc is (pyaxengine's source or not)."""
    lib, u64, vp = fake_board.sys, ctypes.c_uint64, ctypes.c_void_p
    lib.AX_SYS_MemAllocCached.argtypes = [ctypes.POINTER(u64), ctypes.POINTER(vp), ctypes.c_uint32, ctypes.c_uint32,
                                          ctypes.c_char_p]
    for name in ("AX_SYS_MflushCache", "AX_SYS_MinvalidateCache"):
        getattr(lib, name).argtypes = [u64, vp, ctypes.c_uint32]
    lib.AX_SYS_MemFree.argtypes = [u64, vp]
    phy, vir = u64(), vp()
    assert lib.AX_SYS_MemAllocCached(ctypes.byref(phy), ctypes.byref(vir), 1000, 128, b"test") == 0
    phys, address = phy.value, vir.value
    assert phys != address and address % 128 == 0  # physical addresses are not host pointers
    host = np.ctypeslib.as_array((ctypes.c_uint8 * 1000).from_address(address))
    device = fake_board.device_bytes(phys, 1000)
    host[:] = 7
    assert not device.any()  # written, not flushed: the NPU sees nothing
    assert lib.AX_SYS_MflushCache(phys, address, 10) == 0
    assert (device[:64] == 7).all() and not device[64:].any()  # the one cache line covering 10 bytes
    device[:] = 9
    assert (host == 7).all()  # the NPU wrote, the host still reads its cache
    assert lib.AX_SYS_MinvalidateCache(phys + 128, address + 128, 100) == 0
    assert (host[128:256] == 9).all() and (host[:128] == 7).all() and (host[256:] == 7).all()
    # a range past the block, or addresses naming different bytes, are refused and change nothing
    refused = fake_board.sys_stats().refused_calls
    assert lib.AX_SYS_MflushCache(phys, address, 1001) != 0
    assert lib.AX_SYS_MflushCache(phys + 64, address, 10) != 0
    assert lib.AX_SYS_MinvalidateCache(phys + 1000 + 64, address, 1) != 0
    assert fake_board.sys_stats().refused_calls == refused + 3 and (device[:64] == 9).all()
    assert lib.AX_SYS_MemFree(phys, address) == 0


def test_cffi_refuses_sizes_outside_u32(capi):
    """What vlmd must guard against: cffi raises before the library is even called."""
    ffi, lib = capi.sys_cffi, capi.sys_lib
    for size in (-1, 2**32):
        with pytest.raises(OverflowError):
            lib.AX_SYS_MflushCache(0x140000000, ffi.NULL, size)


def test_the_engine_answers_io_info_as_the_graph_declares(real_axengine, fake_board, graph_file, reference_graphs):
    session = real_axengine.InferenceSession(graph_file("layer0"))
    layer = reference_graphs.layers[0]
    assert session._sess._shape_count == layer.num_groups > 1
    for group in range(layer.num_groups):
        got = [(n.name, n.dtype, tuple(n.shape)) for n in session.get_inputs(group)]
        assert got == [(s.name, s.dtype, s.shape) for s in layer.inputs(group)]
        got = [(n.name, n.dtype, tuple(n.shape)) for n in session.get_outputs(group)]
        assert got == [(s.name, s.dtype, s.shape) for s in layer.outputs(group)]


def test_the_engine_reads_device_copies_and_refuses_foreign_contexts(real_axengine, capi, fake_board, graph_file,
                                                                    reference_graphs):
    """A run reads only device copies: input bytes written on the host and not flushed are not seen."""
    session = real_axengine.InferenceSession(graph_file("post"))
    sess, ffi, lib = session._sess, capi.engine_cffi, capi.engine_lib
    spec = reference_graphs.post.inputs(0)[0]
    feed = {spec.name: np.random.default_rng(1).standard_normal(spec.shape).astype(np.float32).astype(spec.dtype)}
    want = session.run(None, feed)[0]
    assert np.array_equal(want, reference_graphs.post.run(feed)[0])
    # other input bytes written to the host mapping only (no flush), then a run
    buffer = sess._io[0].pInputs[0]
    changed = (feed[spec.name].astype(np.float32) + 1).astype(spec.dtype)
    np.frombuffer(ffi.buffer(buffer.pVirAddr, changed.nbytes), np.uint8)[:] = changed.reshape(-1).view(np.uint8)
    assert lib.AX_ENGINE_RunSyncV2(sess._handle[0], sess._context[0], sess._io) == 0
    out = sess._io[0].pOutputs[0]
    assert capi.sys_lib.AX_SYS_MinvalidateCache(out.phyAddr, out.pVirAddr, out.nSize) == 0
    got = np.frombuffer(ffi.buffer(out.pVirAddr, want.nbytes), want.dtype).reshape(want.shape)
    assert np.array_equal(got, want)  # computed from the flushed input, not the host's new bytes
    # a context of another handle, or one input more than the graph has, is refused
    refused = fake_board.engine_stats().refused_runs
    other = real_axengine.InferenceSession(graph_file("vision"))._sess
    assert lib.AX_ENGINE_RunSyncV2(sess._handle[0], other._context[0], sess._io) != 0
    sess._io[0].nInputSize += 1
    assert lib.AX_ENGINE_RunSyncV2(sess._handle[0], sess._context[0], sess._io) != 0
    sess._io[0].nInputSize -= 1
    assert fake_board.engine_stats().refused_runs == refused + 2


def test_a_file_that_is_not_a_model_is_refused(real_axengine, tmp_path):
    path = tmp_path / "broken.axmodel"
    path.write_text(json.dumps({"format": STANDIN_FORMAT + "x"}))
    with pytest.raises(RuntimeError, match="Failed to get model type"):
        real_axengine.InferenceSession(str(path))
