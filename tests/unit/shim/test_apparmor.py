"""The shim finds the policy of an OCI process's AppArmor profile in the host's AppArmor
filesystem, laid out here as the kernel lays it out (policy/profiles/<name>.<n>/{name,raw_data})."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spinbox.shim.apparmor import MAX_POLICY, AppArmorError, host_policy, policy_for_process, policy_for_spec

POLICY = b"\x04\x08\x00version\x00\x02\x05\x00\x00\x00compiled"


def apparmor_fs(tmp_path: Path, profiles: dict[str, bytes | None]) -> Path:
    """An AppArmor filesystem with these profiles loaded (None: the kernel exports no raw_data)."""
    root = tmp_path / "apparmor"
    loaded = root / "policy" / "profiles"
    loaded.mkdir(parents=True)
    (root / "profiles").write_text("".join(f"{name} (enforce)\n" for name in profiles))
    for n, (name, policy) in enumerate(profiles.items()):
        directory = loaded / f"{name.replace('/', '.')}.{n + 1}"
        directory.mkdir()
        (directory / "name").write_text(name + "\n")
        if policy is not None:
            raw = root / "policy" / "raw_data" / str(n + 1)
            raw.mkdir(parents=True)
            (raw / "raw_data").write_bytes(policy)
            (directory / "raw_data").symlink_to(raw / "raw_data")
    return root


def test_the_named_profiles_policy_is_read_from_its_raw_data(tmp_path: Path) -> None:
    root = apparmor_fs(tmp_path, {"other": b"other policy", "cri-validate-deny-write": POLICY})
    assert host_policy("cri-validate-deny-write", str(root)) == POLICY


def test_a_child_profile_comes_with_its_parents_policy(tmp_path: Path) -> None:
    root = apparmor_fs(tmp_path, {"parent": POLICY})
    assert host_policy("parent//hat", str(root)) == POLICY


@pytest.mark.parametrize("profile", ["", "unconfined"])
def test_no_profile_needs_no_policy_even_without_apparmor(tmp_path: Path, profile: str) -> None:
    assert host_policy(profile, str(tmp_path / "absent")) == b""


def test_apparmor_off_on_the_host_is_said(tmp_path: Path) -> None:
    with pytest.raises(AppArmorError, match="'mine', but AppArmor is not enabled on this host"):
        host_policy("mine", str(tmp_path / "absent"))


def test_a_profile_not_loaded_on_the_host_is_said(tmp_path: Path) -> None:
    root = apparmor_fs(tmp_path, {"other": POLICY})
    with pytest.raises(AppArmorError, match="profile 'non-existent-profile' is not loaded on this host"):
        host_policy("non-existent-profile", str(root))


def test_a_kernel_that_exports_no_policy_is_said(tmp_path: Path) -> None:
    root = apparmor_fs(tmp_path, {"mine": None})
    with pytest.raises(AppArmorError, match="does not export the policy of AppArmor profile 'mine'"):
        host_policy("mine", str(root))


def test_an_empty_or_oversized_policy_is_refused(tmp_path: Path) -> None:
    root = apparmor_fs(tmp_path, {"empty": b"", "huge": b"x" * (MAX_POLICY + 1)})
    with pytest.raises(AppArmorError, match="empty policy for AppArmor profile 'empty'"):
        host_policy("empty", str(root))
    with pytest.raises(AppArmorError, match="'huge' is larger than"):
        host_policy("huge", str(root))


def test_the_spec_and_an_exec_process_name_their_profile(tmp_path: Path) -> None:
    root = str(apparmor_fs(tmp_path, {"mine": POLICY}))
    assert policy_for_spec({"process": {"apparmorProfile": "mine"}}, root) == POLICY
    assert policy_for_spec({"process": {"args": ["true"]}}, root) == b""
    assert policy_for_spec({}, root) == b""
    assert policy_for_process(json.dumps({"apparmorProfile": "mine"}).encode(), root) == POLICY
    assert policy_for_process(b"not json", root) == b""
    with pytest.raises(AppArmorError, match="apparmorProfile is not a string"):
        policy_for_spec({"process": {"apparmorProfile": 7}}, root)
