"""Device memory (npu/board/cmm.py): free CMM read as the C++ runtimes read it, refusals that say who holds it."""

from __future__ import annotations

import json

import pytest

from npu.board.cmm import CmmError, CmmInfo, check_fits, parse_cmm_info, read_cmm_info, running_holders
from npu.model import load_model
from tests.fixtures_board import build_board_dir, write_cmm_info

# The totals line as AXERA's kernel prints it (the format StackFlow's parsers and tools read).
TOTALS = (" total size=3145728KB(3072MB),used=283228KB(276MB + 604KB),remain=2862500KB(2795MB + 420KB),"
          "partition_number=1,block_number=41")


def test_the_totals_line_is_parsed():
    assert parse_cmm_info("partitions and blocks...\n" + TOTALS + "\n") == CmmInfo(3145728, 283228, 2862500)
    assert parse_cmm_info("no totals here\n") is None


def test_off_a_board_there_is_nothing_to_read(monkeypatch, tmp_path):
    monkeypatch.setenv("VLMD_AX_PROC", str(tmp_path / "absent"))
    assert read_cmm_info() is None
    check_fits(10**9, None, "anything")  # not a board: nothing to refuse


def test_holders_are_named_from_the_running_stackflow_units(tmp_path):
    for pid, comm in ((101, "llm_vlm-1.11"), (102, "llm_sys-1.6"), (103, "llm_llm-1.12"), (104, "bash")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
    holders = running_holders(tmp_path)
    assert holders == ["llm-llm", "llm-vlm"]  # llm-sys loads no model
    with pytest.raises(CmmError, match=r"running now: llm-llm, llm-vlm; stop them with `systemctl stop llm-llm llm-vlm`"):
        check_fits(2048 * 1024, CmmInfo(3145728, 2097152, 1048576), "its graph files", holders)


def test_a_model_that_does_not_fit_is_refused_before_it_loads(axengine_standin, tiny_internvl_native, tmp_path,
                                                              monkeypatch):
    board = build_board_dir(tiny_internvl_native.path, tmp_path / "board", "axera")
    monkeypatch.setenv("VLMD_AX_PROC", str(write_cmm_info(tmp_path / "proc", 3145728, 3145728 - 40)))  # 40 KiB free
    with pytest.raises(CmmError) as caught:
        load_model(board, backend="axengine")
    message = str(caught.value)
    # the graph files fit; with layer 0 open, its IO buffers times the layers do not
    assert "of device memory (CMM, its graph files and layer IO buffers) but only 40 KiB of 3072 MiB" in message
    assert "systemctl stop llm-vlm" in message
    assert axengine_standin.STATS.sessions_created == 1  # refused before the rest was opened


def test_the_packages_cmm_size_is_what_it_needs(axengine_standin, tiny_internvl_native, tmp_path, monkeypatch):
    board = build_board_dir(tiny_internvl_native.path, tmp_path / "m5", "m5stack", model_name="internvl3-1B-448-ax630c",
                            mode_extra={"cmm_size": 1674992})  # KiB, as StackFlow's mode file declares it
    monkeypatch.setenv("VLMD_AX_PROC", str(write_cmm_info(tmp_path / "proc", 3145728, 2097152)))  # 1 GiB free
    with pytest.raises(CmmError, match=r"needs about 1635 MiB of device memory \(CMM, the package's cmm_size\)"):
        load_model(board, backend="axengine")
    assert axengine_standin.STATS.sessions_created == 0


def test_loaded_graphs_are_not_counted_again(axengine_standin, axera_board_dir, tmp_path, monkeypatch):
    load_model(axera_board_dir, backend="axengine")  # this process holds its sessions (and their CMM) now
    monkeypatch.setenv("VLMD_AX_PROC", str(write_cmm_info(tmp_path / "proc", 3145728, 3145728 - 8)))
    model = load_model(axera_board_dir, backend="axengine")  # a reload: nothing new to fit
    assert model.describe()["cmm"]["after"]["remain_kb"] == 8


def test_inspect_reports_device_memory_and_the_data_path(board_axengine, tiny_internvl_native, tmp_path, capsys):
    from daemon.cli import main

    board = build_board_dir(tiny_internvl_native.path, tmp_path / "board", "axera")
    assert main(["model", "inspect", "--json", str(board)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cmm"]["before"] == {"total_kb": 3145728, "used_kb": 18876, "remain_kb": 3145728 - 18876}
    assert report["cmm"]["needed_from"] == "its graph files and layer IO buffers" and report["cmm"]["needed_kb"] > 0
    assert report["runtime"]["pyaxengine"] == "0.1.3" and report["runtime"]["shape_groups"] is True
    assert report["data_path"]["data_path"] == "zero-copy" and "bit-identical" in report["data_path"]["reason"]
    assert main(["model", "inspect", "--data-path", "public", str(board)]) == 0
    out = capsys.readouterr().out
    assert "data path public: model.data_path = public" in out and "cmm       total 3072 MiB" in out
