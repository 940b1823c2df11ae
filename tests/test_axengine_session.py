"""AxEngineSession over the strict axengine stand-in, and the stand-in's own strictness."""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import pytest

from npu.board.axengine_session import (
    PROVIDER_BOARD,
    PROVIDER_PCIE,
    AxEngineSession,
    AxEngineUnavailable,
    open_session,
    provider_arguments,
    read_shape_groups,
)
from npu.reference import build_reference_sessions
from npu.session import BF16, MASK_BLOCKED, SessionError
from tests.fixtures_board import BOARD_BUILD


@pytest.fixture(scope="module")
def reference_graphs(tiny_internvl_native):
    return build_reference_sessions(tiny_internvl_native.path, precision="bf16", **BOARD_BUILD)


def decode_feed(session, position: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid group-0 feed with random cache rows 0..position-1 and the mask opening them."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in session.inputs(0):
        if spec.name == "indices":
            feed[spec.name] = np.full(spec.shape, position, np.uint32)
        elif spec.name == "mask":
            mask = np.full(spec.shape, MASK_BLOCKED, np.float32)  # (1, 1, capacity + 1)
            mask[..., :position] = 0
            mask[..., -1] = 0
            feed[spec.name] = mask.astype(spec.dtype)
        else:
            feed[spec.name] = rng.standard_normal(spec.shape).astype(np.float32).astype(spec.dtype)
    return feed


# --- provider choice ---------------------------------------------------------------------------


def test_provider_auto_takes_the_boards_npu_when_it_is_there():
    # pyaxengine before 3554448 lists the PCIe provider first whenever libaxcl_rt exists
    both = [PROVIDER_PCIE, PROVIDER_BOARD]
    assert provider_arguments("auto", 0, both, board_npu=True) == ([PROVIDER_BOARD], None)
    assert provider_arguments("auto", 0, both, board_npu=False) == ([PROVIDER_PCIE], [{"device_id": 0}])
    assert provider_arguments("auto", 0, [PROVIDER_BOARD], board_npu=False) == ([PROVIDER_BOARD], None)


def test_provider_auto_reads_the_boards_proc_dir(monkeypatch, tmp_path):
    both = [PROVIDER_PCIE, PROVIDER_BOARD]
    monkeypatch.setenv("VLMD_AX_PROC", str(tmp_path))  # /proc/ax_proc exists: a board
    assert provider_arguments("auto", 0, both) == ([PROVIDER_BOARD], None)
    monkeypatch.setenv("VLMD_AX_PROC", str(tmp_path / "absent"))  # a PCIe host
    assert provider_arguments("auto", 0, both) == ([PROVIDER_PCIE], [{"device_id": 0}])


def test_provider_pcie_carries_the_device_id():
    assert provider_arguments("axclrt", 2, [PROVIDER_BOARD, PROVIDER_PCIE]) == ([PROVIDER_PCIE], [{"device_id": 2}])


def test_provider_errors_are_explained():
    with pytest.raises(AxEngineUnavailable, match="not available here"):
        provider_arguments("axclrt", 0, [PROVIDER_BOARD])
    with pytest.raises(SessionError, match="unknown provider 'npu'"):
        provider_arguments("npu", 0, [PROVIDER_BOARD])
    with pytest.raises(AxEngineUnavailable, match="no available execution provider"):
        provider_arguments("auto", 0, [])


def test_missing_axengine_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "axengine", None)  # import axengine -> ImportError
    with pytest.raises(AxEngineUnavailable, match="pyaxengine wheel"):
        AxEngineSession(tmp_path / "x.axmodel")


class _Node:
    def __init__(self, name, dtype, shape):
        self.name, self.dtype, self.shape = name, dtype, shape


class _IgnoresGroups:
    """An old runtime that answers group 0 whatever group is asked, with string dtypes."""

    def get_inputs(self, group=0):
        return [_Node("input", "bfloat16", [1, 1, 8])]

    def get_outputs(self, group=0):
        return [_Node("output", "float32", [1, 1, 8])]


def test_group_probe_stops_on_a_runtime_that_ignores_groups():
    inputs, outputs = read_shape_groups(_IgnoresGroups())
    assert len(inputs) == 1
    assert inputs[0][0].dtype == BF16 and inputs[0][0].shape == (1, 1, 8)
    assert outputs[0][0].dtype == np.float32


# --- sessions on the stand-in -------------------------------------------------------------------


def test_session_exposes_the_graphs_groups(board_axengine, graph_file, reference_graphs):
    session = AxEngineSession(graph_file("layer0"), name="layer0")
    reference = reference_graphs.layers[0]
    assert session.num_groups == reference.num_groups == 3  # decode, first chunk, one history group
    for group in range(session.num_groups):
        assert session.inputs(group) == reference.inputs(group)
        assert session.outputs(group) == reference.outputs(group)
    assert session.provider == PROVIDER_BOARD


def test_pcie_provider_gets_the_device_id(axengine_standin, graph_file, monkeypatch):
    monkeypatch.setenv("VLMD_STANDIN_PROVIDERS", f"{PROVIDER_PCIE},{PROVIDER_BOARD}")
    session = AxEngineSession(graph_file("post"), provider="axclrt", device_id=1)
    assert session._session.get_providers() == PROVIDER_PCIE
    assert session._session._sess._device_index == 1  # read from provider_options[0]
    assert session._session.get_inputs(0)[0].shape == [1, 1, 64]
    assert session.inputs(0)[0].shape == (1, 1, 64)  # axengine reports lists; the session gives tuples


def test_run_matches_the_reference_exactly(board_axengine, graph_file, reference_graphs):
    session = AxEngineSession(graph_file("layer1"))
    reference = reference_graphs.layers[1]
    feed = decode_feed(session)
    got = session.run(feed, 0)
    want = [np.array(a) for a in reference.run(feed, 0)]
    assert [a.dtype for a in got] == [BF16] * 3
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


def test_fed_arrays_reach_axengine_uncopied_and_its_copies_are_counted(board_axengine, graph_file, monkeypatch):
    session = AxEngineSession(graph_file("layer0"))
    if board_axengine.fake is not None:
        board_axengine.fake.reset_sys_stats()
    seen = {}
    original = session._session.run

    def spy(output_names, input_feed, run_options=None, shape_group=0):
        seen.update(input_feed, output_names=output_names)
        return original(output_names, input_feed, run_options, shape_group)

    monkeypatch.setattr(session._session, "run", spy)
    feed = decode_feed(session)
    session.run(feed, 0)
    assert all(seen[name] is feed[name] for name in feed)  # the KV cache itself, no host staging copy
    assert seen["output_names"] is None
    if board_axengine.fake is not None:  # what libax_sys was asked to do, counted in C
        stats = board_axengine.fake.sys_stats()
        assert session.traffic.flushed == stats.flushed_bytes > session.traffic.written
        assert session.traffic.invalidated == stats.invalidated_bytes
        assert stats.refused_calls == 0
        return
    stats = board_axengine.module.STATS
    assert stats.bytes_in == sum(a.nbytes for a in feed.values())  # axengine's one copy
    # vlmd's count of what pyaxengine did to device memory agrees with the stand-in's
    assert session.traffic.written == stats.bytes_in
    assert session.traffic.flushed == stats.bytes_flushed > session.traffic.written
    assert session.traffic.invalidated == stats.bytes_invalidated


def test_bad_feeds_are_refused_with_the_tensor_named(board_axengine, graph_file):
    session = AxEngineSession(graph_file("layer0"))
    feed = decode_feed(session)
    with pytest.raises(SessionError, match="missing inputs \\['mask'\\]"):
        session.run({k: v for k, v in feed.items() if k != "mask"}, 0)
    as_uint16 = dict(feed, input=feed["input"].view(np.uint16))
    with pytest.raises(SessionError, match="input input has dtype uint16"):
        session.run(as_uint16, 0)
    with pytest.raises(SessionError, match="K_cache has shape"):
        session.run(dict(feed, K_cache=feed["K_cache"][:, :-1]), 0)
    with pytest.raises(SessionError, match="out of range"):
        session.run(feed, 3)


def test_open_session_keeps_one_session_per_graph(axengine_standin, graph_file):
    path = graph_file("post")
    first = open_session(path, name="post")
    assert open_session(path, name="post") is first
    assert axengine_standin.STATS.sessions_created == 1


def test_topk_post_graph(board_axengine, graph_file, reference_graphs):
    session = AxEngineSession(graph_file("post", post_topk=8))
    assert [(s.name, s.dtype) for s in session.outputs(0)] == [("indices", np.dtype(np.int32)), ("values", BF16)]
    row = np.random.default_rng(1).standard_normal((1, 1, 64)).astype(ml_dtypes.bfloat16)
    indices, values = session.run({"input": row}, 0)
    logits = np.asarray(reference_graphs.post.run({"input": row}, 0)[0], np.float32).reshape(-1)
    assert int(indices[0, 0, 0]) == int(np.argmax(logits))


# --- the stand-in is as strict as the real axengine ---------------------------------------------


def test_standin_rejects_what_axengine_rejects(axengine_standin, graph_file):
    raw = axengine_standin.InferenceSession(graph_file("layer0"))
    specs = raw.get_inputs(0)
    feed = {n.name: np.zeros(n.shape, n.dtype) for n in specs}
    with pytest.raises(ValueError, match="missing"):
        raw.run(None, {k: v for k, v in feed.items() if k != "indices"})
    with pytest.raises(ValueError, match="Unexpected inputs"):
        raw.run(None, dict(feed, extra=np.zeros(1)))
    with pytest.raises(AssertionError, match="dtype"):
        raw.run(None, dict(feed, mask=feed["mask"].view(np.uint16)))
    with pytest.raises(AssertionError, match="shape"):
        raw.run(None, dict(feed, input=np.zeros((1, 2, 64), BF16)))
    with pytest.raises(ValueError, match="out of range"):  # get_outputs(5) fails before run's own check
        raw.run(None, feed, shape_group=5)
    with pytest.raises(ValueError, match="Invalid shape group"):
        raw.run(["output", "K_cache_out", "V_cache_out"], feed, shape_group=5)
    with pytest.raises(IndexError):  # the group just past the last: the real base class's off-by-one
        raw.get_inputs(3)
    with pytest.raises(ValueError, match="out of range"):
        raw.get_inputs(4)


def test_standin_refuses_a_real_model_file(axengine_standin, tmp_path):
    path = tmp_path / "real.axmodel"
    path.write_bytes(b"\x00AXMODEL")
    with pytest.raises(RuntimeError, match="Failed to load model"):
        axengine_standin.InferenceSession(str(path))
    with pytest.raises(SessionError, match="could not load"):
        AxEngineSession(path)
