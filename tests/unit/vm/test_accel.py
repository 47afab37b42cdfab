"""Accelerator choice: KVM only where it can run an ordinary guest kernel."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spinbox.host import KvmHost
from spinbox.vm import VmError, accel
from spinbox.vm.accel import choose_accel


@pytest.fixture(autouse=True)
def fresh_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "_warned", False)


def host(tmp_path: Path, kvm: bool, pvm: bool) -> KvmHost:
    dev = tmp_path / "kvm"
    if kvm:
        dev.write_bytes(b"")
    module = tmp_path / "kvm_pvm"
    if pvm:
        module.mkdir()
    return KvmHost(dev_kvm=dev, pvm_module=module)


def test_kvm_when_usable(tmp_path: Path) -> None:
    assert choose_accel("auto", host(tmp_path, kvm=True, pvm=False)) == "kvm"
    assert choose_accel("kvm", host(tmp_path, kvm=True, pvm=False)) == "kvm"


def test_tcg_without_dev_kvm_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="spinbox.vm.accel")
    kvmless = host(tmp_path, kvm=False, pvm=False)
    assert choose_accel("auto", kvmless) == "tcg"
    assert choose_accel("auto", kvmless) == "tcg"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "TCG" in warnings[0] and "does not exist" in warnings[0]


def test_pvm_is_not_usable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="spinbox.vm.accel")
    assert choose_accel("auto", host(tmp_path, kvm=True, pvm=True)) == "tcg"
    assert "PVM" in caplog.text


def test_asking_for_kvm_without_it_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="KVM was asked for but is not usable: the host's KVM is PVM"):
        choose_accel("kvm", host(tmp_path, kvm=True, pvm=True))


def test_tcg_on_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert choose_accel("tcg", host(tmp_path, kvm=True, pvm=False)) == "tcg"
    assert not caplog.records
