"""A template's guest stops reporting free pages before it is saved."""

from __future__ import annotations

from pathlib import Path

from guest.vminitd.refresh import stop_page_reporting


def test_the_balloon_driver_is_unbound_from_its_devices(tmp_path: Path) -> None:
    driver = tmp_path / "virtio_balloon"
    driver.mkdir()
    (driver / "virtio3").mkdir()
    (driver / "unbind").write_text("")
    (driver / "module").mkdir()
    assert stop_page_reporting(driver) == ["virtio3"]
    assert (driver / "unbind").read_text() == "virtio3"


def test_no_balloon_means_nothing_to_stop(tmp_path: Path) -> None:
    assert stop_page_reporting(tmp_path / "absent") == []
