"""AppArmor, with real containerd: a container whose spec names a profile loaded on the host runs
confined by that profile in its VM's kernel, and one naming a profile the host has not loaded
is refused with a sentence naming it.

The profiles are cri-tools' own AppArmor test profiles (critest's AppArmor specs). On a host
whose kernel has AppArmor on, they are loaded there with apparmor_parser, as critest does. On a
host without it (these test machines), the host's AppArmor filesystem is laid out inside the
test systemd's namespaces as the kernel lays it out, holding the policy apparmor_parser compiled
from them: what reaches the guest and confines the container there is the same either way.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.stack import BUILDS, IMAGE, NOTHING_LEFT, RUNTIME, Containerd, wait_until_clean
from tests.harness.systemd import PrivateSystemd

DENY_WRITE = "spinbox-test-apparmor-deny-write"
AUDIT_WRITE = "spinbox-test-apparmor-audit-write"
PROFILES = f"""
#include <tunables/global>
profile {DENY_WRITE} flags=(attach_disconnected) {{
  #include <abstractions/base>
  file,
  deny /** w,
}}
profile {AUDIT_WRITE} flags=(attach_disconnected) {{
  #include <abstractions/base>
  file,
  audit /** w,
}}
"""
SECURITYFS = "/sys/kernel/security"
HOST_APPARMOR = Path("/sys/module/apparmor/parameters/enabled")


def host_has_apparmor() -> bool:
    try:
        return HOST_APPARMOR.read_text().startswith("Y")
    except OSError:
        return False


def lay_out_apparmor_fs(stack: PrivateSystemd, policy: bytes) -> None:
    """The host kernel's AppArmor filesystem with one loaded policy defining both profiles."""
    stack.run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", SECURITYFS)
    root = stack.path(SECURITYFS) / "apparmor"
    raw = root / "policy" / "raw_data" / "1"
    raw.mkdir(parents=True)
    (raw / "raw_data").write_bytes(policy)
    (root / "profiles").write_text(f"{DENY_WRITE} (enforce)\n{AUDIT_WRITE} (enforce)\n")
    for n, name in enumerate((DENY_WRITE, AUDIT_WRITE), start=1):
        profile = root / "policy" / "profiles" / f"{name}.{n}"
        profile.mkdir(parents=True)
        (profile / "name").write_text(name + "\n")
        os.symlink("../../raw_data/1/raw_data", profile / "raw_data")


@pytest.fixture(scope="module")
def host_profiles(stack: PrivateSystemd) -> Iterator[None]:
    """Both test profiles loaded on the host, as far as the test systemd's processes see."""
    if host_has_apparmor():
        stack.run("mount", "-t", "securityfs", "securityfs", SECURITYFS, check=False)
        stack.run("apparmor_parser", "--replace", input=PROFILES)
        try:
            yield
        finally:
            stack.run("apparmor_parser", "--remove", input=PROFILES, check=False)
        return
    compiled = subprocess.run(
        ["apparmor_parser", "--skip-kernel-load", "--stdout"],
        input=PROFILES.encode(),
        capture_output=True,
        check=True,
        timeout=60,
    )
    lay_out_apparmor_fs(stack, compiled.stdout)
    try:
        yield
    finally:
        stack.run("umount", SECURITYFS)


@pytest.fixture(scope="module", params=sorted(BUILDS), ids=lambda name: f"containerd-{name}")
def containerd(
    request: pytest.FixtureRequest, stack: PrivateSystemd, host_profiles: None
) -> Iterator[Containerd]:
    build = BUILDS[request.param]
    if not build.available:
        pytest.skip(f"containerd {build.name} is not installed (tools/install-test-clients)")
    with Containerd.running(stack, build) as instance:
        yield instance


WRITE = ["sh", "-c", "touch /tmp/written && echo wrote"]


def run_with_profile(
    containerd: Containerd, container_id: str, profile: str, *command: str, detach: bool = False
) -> subprocess.CompletedProcess[str]:
    mode = "-d" if detach else "--rm"
    return containerd.ctr(
        "run", mode, "--runtime", RUNTIME, "--apparmor-profile", profile, IMAGE, container_id, *command,
        check=False,
    )  # fmt: skip


def test_the_profile_the_spec_names_confines_the_container_in_its_vm(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    tag = containerd.build.name.replace(".", "")
    denied, audited = f"aa-deny-{tag}", f"aa-audit-{tag}"
    try:
        with ThreadPoolExecutor() as pool:
            started = pool.submit(
                run_with_profile, containerd, denied, DENY_WRITE, "sh", "-c", "exec sleep 3600", detach=True
            )
            audit_run = pool.submit(run_with_profile, containerd, audited, AUDIT_WRITE, *WRITE)
            assert started.result().returncode == 0, started.result()
            audit = audit_run.result()
        # The guest's kernel confines the container's init by the profile, enforcing ...
        current = containerd.ctr("task", "exec", "--exec-id", "attr", denied, "cat", "/proc/1/attr/current")
        assert current.stdout.strip() == f"{DENY_WRITE} (enforce)"
        # ... and an exec process too (its OCI process names the container's profile).
        write = containerd.ctr("task", "exec", "--exec-id", "write", denied, *WRITE, check=False)
        assert write.returncode != 0, write
        assert "Permission denied" in write.stdout + write.stderr, write
        assert "wrote" not in write.stdout
        # The audit-only profile lets the write through.
        assert audit.returncode == 0, audit
        assert audit.stdout.strip() == "wrote"
    finally:
        containerd.ctr("task", "kill", "-s", "SIGKILL", denied, check=False)
        for container_id in (denied, audited):
            containerd.ctr("task", "delete", "-f", container_id, check=False)
            containerd.ctr("containers", "delete", container_id, check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_a_profile_not_loaded_on_the_host_is_refused_naming_it(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    container_id = f"aa-missing-{containerd.build.name.replace('.', '')}"
    try:
        result = run_with_profile(containerd, container_id, "non-existent-profile", *WRITE)
        assert result.returncode != 0
        assert "AppArmor profile 'non-existent-profile' is not loaded on this host" in result.stderr, result
    finally:
        containerd.ctr("containers", "delete", container_id, check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
