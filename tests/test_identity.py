"""The default device id is unique per board (issue 16 item 9): `<host>-<MAC suffix>` from
the primary interface, read from a /sys/class/net tree and a /proc/net/route table laid
out as the kernel lays them out."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Config, load_config
from daemon.config.identity import default_device_id, primary_mac

ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def sysfs(tmp_path: Path, interfaces: dict[str, tuple[str, bool]], default_route: str | None = None) -> tuple[Path, Path]:
    """interfaces: name -> (address, physical); physical ones get a `device` link."""
    net = tmp_path / "sys" / "class" / "net"
    for name, (address, physical) in interfaces.items():
        folder = net / name
        folder.mkdir(parents=True)
        (folder / "address").write_text(address + "\n")
        if physical:
            (tmp_path / "devices" / name).mkdir(parents=True)
            (folder / "device").symlink_to(tmp_path / "devices" / name)
    route = tmp_path / "route"
    lines = ROUTE_HEADER
    if default_route:
        lines += f"{default_route}\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    lines += "eth9\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    route.write_text(lines)
    return net, route


BOARD = {"lo": ("00:00:00:00:00:00", False), "eth0": ("48:e7:29:a1:b2:c3", True),
         "wlan0": ("48:e7:29:d4:e5:f6", True), "docker0": ("02:42:ac:11:00:01", False)}


def test_two_boards_from_one_image_get_different_ids(tmp_path):
    one = sysfs(tmp_path / "one", {**BOARD, "eth0": ("48:e7:29:a1:b2:c3", True)}, "eth0")
    two = sysfs(tmp_path / "two", {**BOARD, "eth0": ("48:e7:29:00:00:7f", True)}, "eth0")
    assert default_device_id("m5stack-LLM", *one) == "m5stack-LLM-a1b2c3"
    assert default_device_id("m5stack-LLM", *two) == "m5stack-LLM-00007f"


def test_the_same_board_keeps_its_id(tmp_path):
    tree = sysfs(tmp_path, BOARD, "eth0")
    assert default_device_id("llm630", *tree) == default_device_id("llm630", *tree) == "llm630-a1b2c3"


def test_default_route_interface_is_primary(tmp_path):
    assert primary_mac(*sysfs(tmp_path, BOARD, "wlan0")) == "48:e7:29:d4:e5:f6"


def test_without_a_default_route_the_first_physical_interface_with_a_unique_mac(tmp_path):
    # docker0 sorts first but is virtual with a locally administered MAC; lo has none
    assert primary_mac(*sysfs(tmp_path, BOARD)) == "48:e7:29:a1:b2:c3"


def test_a_locally_administered_mac_on_the_default_route_is_used_when_nothing_better(tmp_path):
    tree = sysfs(tmp_path, {"lo": ("00:00:00:00:00:00", False), "eth0": ("02:fc:00:00:00:01", True)}, "eth0")
    assert default_device_id("vm", *tree) == "vm-000001"


def test_no_interfaces_falls_back_to_the_host_name(tmp_path):
    assert default_device_id("M5Stack LLM/630", tmp_path / "none", tmp_path / "no-route") == "M5Stack-LLM-630"


def test_long_host_names_leave_room_for_the_suffix_and_ids_stay_valid(tmp_path):
    tree = sysfs(tmp_path, BOARD, "eth0")
    device_id = default_device_id("h" * 80, *tree)
    assert len(device_id) == 64 and device_id.endswith("-a1b2c3")
    Config(device_id=device_id)  # a valid device id (the camera charset, at most 64 characters)


def test_host_names_that_already_carry_the_mac_are_kept(tmp_path):
    assert default_device_id("m5stack-a1b2c3", *sysfs(tmp_path, BOARD, "eth0")) == "m5stack-a1b2c3"


def test_config_default_uses_it_and_an_explicit_id_wins(tmp_path, monkeypatch):
    import daemon.config.identity as identity

    net, route = sysfs(tmp_path, BOARD, "eth0")
    monkeypatch.setattr(identity, "SYS_CLASS_NET", net)
    monkeypatch.setattr(identity, "PROC_ROUTE", route)
    monkeypatch.setattr(identity.socket, "gethostname", lambda: "board")
    config = load_config(None, {})
    assert (config.device_id, config.root, config.mqtt.client_id) == ("board-a1b2c3", "vlmd/board-a1b2c3",
                                                                      "vlmd-board-a1b2c3")
    assert load_config(None, {"VLMD_DEVICE_ID": "porch"}).device_id == "porch"


@pytest.mark.skipif(not Path("/sys/class/net").is_dir(), reason="no /sys/class/net on this machine")
def test_this_machine_gets_a_valid_id():
    Config(device_id=default_device_id())
