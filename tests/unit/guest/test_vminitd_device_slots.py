"""vminitd in a VM restored from a template: its NICs and disks in the template's device slots."""

from __future__ import annotations

import fcntl
import stat
from pathlib import Path
from typing import Any

import pytest

from guest.vminitd import network, rootfs
from guest.vminitd.network import SLOT_MAC, NetworkConfigError, find_by_mac


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


class FakeNetlink:
    def __init__(self, links: dict[int, str]) -> None:
        self.addresses = {index: mac_bytes(mac) for index, mac in links.items()}
        self.changes: list[tuple[int, bytes]] = []

    def links(self) -> list[tuple[int, bytes]]:
        return sorted(self.addresses.items())

    def set_link(self, index: int, address: bytes | None = None, **_: Any) -> None:
        assert address is not None
        self.changes.append((index, address))
        self.addresses[index] = address


def test_the_first_unclaimed_slot_nic_takes_the_requested_mac() -> None:
    nl = FakeNetlink({1: "00:00:00:00:00:00", 2: SLOT_MAC, 3: SLOT_MAC})
    assert find_by_mac(nl, "52:54:00:12:34:50") == 2  # type: ignore[arg-type]
    assert find_by_mac(nl, "52:54:00:12:34:51") == 3  # type: ignore[arg-type]
    assert nl.changes == [(2, mac_bytes("52:54:00:12:34:50")), (3, mac_bytes("52:54:00:12:34:51"))]
    # Asked again (a second configuration), the NIC is found by the MAC it now has.
    assert find_by_mac(nl, "52:54:00:12:34:50") == 2  # type: ignore[arg-type]
    assert len(nl.changes) == 2


def test_a_nic_with_the_requested_mac_is_never_confused_with_a_slot() -> None:
    nl = FakeNetlink({2: SLOT_MAC, 5: "52:54:00:12:34:50"})
    assert find_by_mac(nl, "52:54:00:12:34:50") == 5  # type: ignore[arg-type]
    assert nl.changes == []


def test_without_a_free_slot_a_hot_plugged_nic_is_waited_for() -> None:
    nl = FakeNetlink({2: "52:54:00:12:34:50"})
    with pytest.raises(NetworkConfigError, match="no network interface has MAC 52:54:00:12:34:51"):
        find_by_mac(nl, "52:54:00:12:34:51", wait=0.05)  # type: ignore[arg-type]


def test_a_slot_disk_s_cached_blocks_are_dropped_before_its_mount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(fcntl, "ioctl", lambda fd, request: calls.append(request))
    device = tmp_path / "vda"
    device.write_bytes(b"")
    rootfs.drop_cached_blocks(device)
    assert calls == []  # a regular file has no block cache
    monkeypatch.setattr(stat, "S_ISBLK", lambda mode: True)
    rootfs.drop_cached_blocks(device)
    assert calls == [rootfs.BLKFLSBUF]
    rootfs.drop_cached_blocks(tmp_path / "absent")  # not there yet: nothing cached either
    assert calls == [rootfs.BLKFLSBUF]


def test_netlink_sets_a_link_s_address(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int, bytes]] = []
    nl = network.Netlink.__new__(network.Netlink)
    monkeypatch.setattr(
        nl, "request", lambda kind, flags, body: sent.append((kind, flags, body)), raising=False
    )
    nl.set_link(7, address=mac_bytes("52:54:00:12:34:50"))
    ((kind, _, body),) = sent
    assert kind == network.RTM_NEWLINK
    assert network._attrs(body[16:])[network.IFLA_ADDRESS] == mac_bytes("52:54:00:12:34:50")
