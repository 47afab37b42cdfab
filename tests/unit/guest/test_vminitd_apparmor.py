"""vminitd loads the policy the shim sent into the guest's AppArmor filesystem and checks the
profile is loaded before crun applies it (the filesystem laid out here as a directory)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from guest.vminitd import apparmor, syscalls
from guest.vminitd.validate import InvalidRequest
from spinbox.ttrpc import TtrpcError

POLICY = b"\x04\x08\x00version\x00compiled"


def securityfs(tmp_path: Path, loaded: str = "") -> Path:
    root = tmp_path / "security"
    (root / "apparmor").mkdir(parents=True)
    (root / "apparmor" / "profiles").write_text(loaded)
    (root / "apparmor" / ".replace").write_bytes(b"")
    return root


def test_the_policy_is_written_in_one_piece_and_the_profile_checked(tmp_path: Path) -> None:
    root = securityfs(tmp_path, "deny-write (enforce)\naudit-write (enforce)\n")
    apparmor.prepare({"apparmorProfile": "deny-write"}, POLICY, "container c", str(root))
    assert (root / "apparmor" / ".replace").read_bytes() == POLICY


def test_a_profile_no_policy_defined_is_said(tmp_path: Path) -> None:
    root = securityfs(tmp_path, "other (enforce)\n")
    with pytest.raises(TtrpcError, match="container c asks for AppArmor profile 'mine', which is not loaded"):
        apparmor.prepare({"apparmorProfile": "mine"}, POLICY, "container c", str(root))


def test_a_refused_policy_is_said(tmp_path: Path) -> None:
    root = securityfs(tmp_path)
    (root / "apparmor" / ".replace").unlink()
    (root / "apparmor" / ".replace").mkdir()  # writing fails as the kernel's refusal would
    with pytest.raises(TtrpcError, match="the VM's kernel refused the AppArmor policy of profile 'mine'"):
        apparmor.prepare({"apparmorProfile": "mine"}, POLICY, "container c", str(root))


def test_a_guest_kernel_without_apparmor_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mounted: list[str] = []
    monkeypatch.setattr(syscalls, "mount", lambda source, target, *a: mounted.append(target))
    with pytest.raises(TtrpcError, match="'mine', but the VM's kernel has no AppArmor enabled"):
        apparmor.prepare({"apparmorProfile": "mine"}, POLICY, "container c", str(tmp_path))
    assert mounted == [str(tmp_path)]  # securityfs is mounted first


def test_securityfs_that_cannot_be_mounted_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(syscalls, "mount", refuse)
    with pytest.raises(TtrpcError, match="securityfs cannot be mounted: Operation not permitted"):
        apparmor.prepare({"apparmorProfile": "mine"}, b"", "exec e", str(tmp_path))


@pytest.mark.parametrize("profile", ["", "unconfined"])
def test_no_profile_touches_nothing(tmp_path: Path, profile: str) -> None:
    apparmor.prepare({"apparmorProfile": profile}, b"", "container c", str(tmp_path / "absent"))
    apparmor.prepare({}, b"", "container c", str(tmp_path / "absent"))


def test_a_profile_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="apparmorProfile of container c is not a string"):
        apparmor.prepare({"apparmorProfile": ["x"]}, b"", "container c", str(tmp_path))
