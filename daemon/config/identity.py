"""The default device id: unique per board, stable across reboots, readable.

Boards flashed from one image share a host name, so a host-name id would give them one
topic root and one MQTT client id (the broker then disconnects one whenever the other
connects). The default is therefore `<host name>-<last 6 hex digits of the primary
network interface's MAC address>`, read from /sys/class/net: the NIC-specific half of a
MAC, which differs between boards of one vendor and survives reboots.

The primary interface, in this order: the one carrying the default route (/proc/net/route)
when its MAC is globally unique; else the first physical interface (one with a `device`
link) by name whose MAC is globally unique; else the default route's interface with any
non-zero MAC (virtual machines, boards with a locally administered MAC). Without any, the
host name alone. A board whose MAC changes at every boot needs `device_id` set by hand.
"""

from __future__ import annotations

import socket
from pathlib import Path

from protocol.topics import topic_safe

SYS_CLASS_NET = Path("/sys/class/net")
PROC_ROUTE = Path("/proc/net/route")
SUFFIX_HEX_DIGITS = 6
MAX_ID_CHARS = 64


def default_device_id(hostname: str | None = None, sys_class_net: Path | None = None,
                      proc_route: Path | None = None) -> str:
    """`<host>-<mac suffix>`, or the topic-safe host name when no MAC can be read."""
    host = topic_safe(socket.gethostname() if hostname is None else hostname)
    mac = primary_mac(sys_class_net or SYS_CLASS_NET, proc_route or PROC_ROUTE)
    if mac is None:
        return host
    suffix = mac.replace(":", "")[-SUFFIX_HEX_DIGITS:].lower()
    if host.lower().endswith(suffix):  # already unique (some images put the MAC in the host name)
        return host
    return f"{host[:MAX_ID_CHARS - SUFFIX_HEX_DIGITS - 1].rstrip('-_.')}-{suffix}"


def primary_mac(sys_class_net: Path = SYS_CLASS_NET, proc_route: Path = PROC_ROUTE) -> str | None:
    """The primary interface's MAC address ("aa:bb:cc:dd:ee:ff"), or None."""
    route_iface = _default_route_interface(proc_route)
    route_mac = _mac(sys_class_net / route_iface) if route_iface else None
    if route_mac is not None and _globally_unique(route_mac):
        return route_mac
    try:
        names = sorted(entry.name for entry in sys_class_net.iterdir())
    except OSError:
        names = []
    for name in names:
        path = sys_class_net / name
        mac = _mac(path)
        if mac is not None and _globally_unique(mac) and (path / "device").exists():
            return mac
    return route_mac


def _default_route_interface(proc_route: Path) -> str | None:
    try:
        lines = proc_route.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[1] == "00000000":
            return fields[0]
    return None


def _mac(interface: Path) -> str | None:
    """An Ethernet-like interface's MAC, or None (loopback, tunnels, all zeros, unreadable)."""
    try:
        address = (interface / "address").read_text().strip().lower()
    except OSError:
        return None
    octets = address.split(":")
    if len(octets) != 6 or not all(len(o) == 2 and all(c in "0123456789abcdef" for c in o) for o in octets):
        return None
    return None if address == "00:00:00:00:00:00" else address


def _globally_unique(mac: str) -> bool:
    """Not locally administered (bit 1 of the first octet) and not multicast (bit 0)."""
    return int(mac[:2], 16) & 0x03 == 0
