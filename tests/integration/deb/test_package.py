"""The Debian package in a real systemd: `apt install ./dist/spinbox_*.deb`
and nothing else gives a running spinbox.service and a containerd that runs
containers in VMs; remove stops it, purge leaves nothing behind, a reinstall
works again.

The tests run in order against one private systemd of their own (its /usr,
/etc and /var are overlays, so installing there never touches the host); the
package is built once per session. Parts that need components the package
does not contain yet (the daemon, the shim) are skipped, saying so.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spinbox.vm.spec import default_kernel
from tests.harness.deb import SpinboxDeb
from tests.harness.fixtures import artifacts_dir
from tests.harness.oci import build_image
from tests.harness.systemd import PrivateSystemd

IMAGE = "localhost/spinbox/busybox:latest"
GUEST_IMAGE = "/var/lib/spinbox/guest/initrd.img"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
SHIM = "/usr/bin/containerd-shim-spinbox-v1"
RUNTIME = "io.containerd.spinbox.v1"
KEEP = "deb-keeps-running"


@pytest.fixture(scope="module")
def box() -> Iterator[PrivateSystemd]:
    """A private systemd of this module's own: the tests change its packages."""
    with PrivateSystemd.booted(artifacts_dir() / "logs", name=f"deb-{uuid.uuid4().hex[:8]}") as instance:
        # Container images of Debian carry a policy-rc.d that forbids starting
        # services from maintainer scripts; a booted machine has none.
        instance.run("rm", "-f", "/usr/sbin/policy-rc.d")
        # man-db reindexes on every apt run that touches manual pages: seconds
        # each time, and nothing of spinbox's.
        instance.run("rm", "-f", "/var/lib/man-db/auto-update")
        yield instance


def apt(box: PrivateSystemd, *args: str) -> subprocess.CompletedProcess[str]:
    return box.run("apt-get", "-y", "-q", "--no-install-recommends", *args, env=APT_ENV, timeout=600)


def inside(box: PrivateSystemd, deb: SpinboxDeb) -> str:
    """The package's path inside the box (whose /tmp is its own)."""
    path = f"/run/spinbox-test/{deb.path.name}"
    if not box.path(path).exists():
        box.install(deb.path, path, mode=0o644)
    return path


def install(box: PrivateSystemd, deb: SpinboxDeb) -> subprocess.CompletedProcess[str]:
    return apt(box, "install", inside(box, deb))


def service_state(box: PrivateSystemd) -> str:
    return box.systemctl("is-active", "spinbox.service", check=False).stdout.strip()


def require(deb: SpinboxDeb, path: str, what: str) -> None:
    if path not in deb.files:
        pytest.skip(f"the package has no {path} yet ({what})")


def leftovers(box: PrivateSystemd) -> list[str]:
    return [
        str(p.relative_to(box.root))
        for d in ("/etc/spinbox", "/var/lib/spinbox", "/run/spinbox")
        if box.path(d).exists()
        for p in box.path(d).rglob("*")
    ]


def test_lintian_reports_no_errors(spinbox_deb: SpinboxDeb) -> None:
    result = subprocess.run(
        ["lintian", "--fail-on", "error", str(spinbox_deb.path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert result.returncode == 0 and not errors, result.stdout + result.stderr


def test_install_with_apt_alone(box: PrivateSystemd, spinbox_deb: SpinboxDeb) -> None:
    result = install(box, spinbox_deb)
    assert box.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "spinbox").stdout.strip() == "ii"
    for path in spinbox_deb.commands:
        assert box.path(path).is_file(), f"{path} missing after install"
    assert box.path("/etc/spinbox/spinbox.toml").is_file()
    conffiles = box.run("dpkg-query", "-W", "-f=${Conffiles}", "spinbox").stdout
    assert "/etc/spinbox/spinbox.toml" in conffiles
    if "/usr/bin/spinbox-mkguest" in spinbox_deb.files:
        assert box.path(GUEST_IMAGE).is_file(), f"postinst built no guest image:\n{result.stdout}"


def test_every_command_answers_help(box: PrivateSystemd, spinbox_deb: SpinboxDeb) -> None:
    if not spinbox_deb.commands:
        pytest.skip("the package has no commands yet")
    for path in spinbox_deb.commands:
        result = box.run(path, "--help", check=False)
        assert result.returncode == 0, f"{path} --help: {result.stderr}"
        assert "usage" in result.stdout.lower(), f"{path} --help printed no usage:\n{result.stdout}"


def test_manual_pages_are_installed(box: PrivateSystemd, spinbox_deb: SpinboxDeb) -> None:
    for page in ("man1/spinboxctl.1", "man8/spinboxd.8", "man5/spinbox.toml.5"):
        assert box.path(f"/usr/share/man/{page}.gz").is_file(), f"no manual page {page}"


def test_service_is_enabled_and_active(box: PrivateSystemd, spinbox_deb: SpinboxDeb) -> None:
    require(spinbox_deb, "/lib/systemd/system/spinbox.service", "the daemon's unit")
    assert box.systemctl("is-enabled", "spinbox.service", check=False).stdout.strip() == "enabled"
    box.wait_for("spinbox.service active", lambda: service_state(box) == "active", timeout=60)
    owner = box.run("busctl", "status", "--no-pager", "org.spinstack.Spinbox", check=False)
    assert owner.returncode == 0, owner.stderr


def test_dpkg_trigger_rebuilds_the_guest_image(box: PrivateSystemd, spinbox_deb: SpinboxDeb) -> None:
    require(spinbox_deb, "/usr/bin/spinbox-mkguest", "the guest image builder")
    image = box.path(GUEST_IMAGE)
    before = image.stat().st_mtime_ns
    # What dpkg does when crun's package changes: activate the file trigger.
    box.run("dpkg-trigger", "--no-await", "/usr/bin/crun")
    result = box.run("dpkg", "--triggers-only", "--pending", timeout=600)
    assert image.stat().st_mtime_ns != before, f"the trigger did not rebuild the image:\n{result.stdout}"


def test_ctr_runs_a_container_in_a_vm(box: PrivateSystemd, spinbox_deb: SpinboxDeb) -> None:
    require(spinbox_deb, SHIM, "the shim")
    require(spinbox_deb, "/lib/systemd/system/spinbox.service", "the daemon's unit")
    box.systemctl("start", "containerd.service")
    box.wait_for("containerd", lambda: box.run("ctr", "version", check=False).returncode == 0, timeout=60)
    tar = build_image(artifacts_dir() / "deb" / "busybox.tar", IMAGE)
    box.run("ctr", "images", "import", str(tar))
    result = box.run(
        "ctr", "run", "--rm", "--runtime", RUNTIME, IMAGE, f"deb-{uuid.uuid4().hex[:8]}", "uname", "-r",
        timeout=300,
    )  # fmt: skip
    guest = default_kernel().name.removeprefix("vmlinuz-")
    assert result.stdout.strip() == guest, "the container did not run on the guest kernel"


def vm_scopes(box: PrivateSystemd) -> list[str]:
    units = box.systemctl("list-units", "--plain", "--no-legend", "--state=active", "spinbox-vm-*").stdout
    return [line.split()[0] for line in units.splitlines() if line.strip()]


def test_upgrade_restarts_spinboxd_keeps_vms(box: PrivateSystemd, spinbox_deb: SpinboxDeb) -> None:
    require(spinbox_deb, "/lib/systemd/system/spinbox.service", "the daemon's unit")
    running = SHIM in spinbox_deb.files
    if running:
        box.run("ctr", "run", "-d", "--runtime", RUNTIME, IMAGE, KEEP, "sleep", "600", timeout=300)
        box.wait_for("a VM scope", lambda: len(vm_scopes(box)) == 1, timeout=60)
    scopes, qemu = vm_scopes(box), box.processes("qemu-system")
    before = box.unit_property("spinbox.service", "MainPID")
    apt(box, "install", "--reinstall", inside(box, spinbox_deb))
    box.wait_for("spinbox.service active", lambda: service_state(box) == "active", timeout=60)
    assert box.unit_property("spinbox.service", "MainPID") != before, "spinboxd was not restarted"
    assert vm_scopes(box) == scopes and box.processes("qemu-system") == qemu, "the upgrade touched a VM"
    if running:
        tasks = box.run("ctr", "task", "ls").stdout
        assert any(line.split()[:1] == [KEEP] and "RUNNING" in line for line in tasks.splitlines()), tasks


def test_remove_stops_the_service_and_the_vms(box: PrivateSystemd, spinbox_deb: SpinboxDeb) -> None:
    apt(box, "remove", "spinbox")
    assert box.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "spinbox").stdout.strip() == "rc"
    assert service_state(box) in ("inactive", "unknown")
    assert not box.processes("spinboxd"), "spinboxd still runs after apt remove"
    assert not vm_scopes(box), "a VM scope is still active after apt remove"
    assert not box.processes("qemu-system"), "a VM still runs after apt remove"
    mounts = box.run("findmnt", "-rn", "-o", "TARGET").stdout.split()
    assert not [m for m in mounts if m.startswith("/run/spinbox/")], "spinboxd did not release a VM's mounts"
    assert not box.path(SHIM).exists()
    assert box.path("/etc/spinbox/spinbox.toml").exists(), "remove must keep the configuration"
    # The container whose VM went away: containerd forgets it.
    box.run("ctr", "task", "kill", "-s", "KILL", KEEP, check=False)
    box.run("ctr", "task", "rm", "-f", KEEP, check=False)
    box.run("ctr", "containers", "rm", KEEP, check=False)


def test_purge_leaves_nothing(box: PrivateSystemd, spinbox_deb: SpinboxDeb) -> None:
    apt(box, "purge", "spinbox")
    assert box.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "spinbox", check=False).stdout.strip() in (
        "",
        "un",
    )
    assert leftovers(box) == []


def test_install_again_after_purge(box: PrivateSystemd, spinbox_deb: SpinboxDeb) -> None:
    install(box, spinbox_deb)
    assert box.path("/etc/spinbox/spinbox.toml").is_file()
    if "/lib/systemd/system/spinbox.service" in spinbox_deb.files:
        box.wait_for("spinbox.service active", lambda: service_state(box) == "active", timeout=60)
    apt(box, "purge", "spinbox")
    assert leftovers(box) == []


def test_package_layout_keeps_modules_private(spinbox_deb: SpinboxDeb) -> None:
    assert not [f for f in spinbox_deb.files if "/dist-packages/" in f or "/site-packages/" in f]
    assert "/usr/lib/spinbox/python/spinbox/__init__.py" in spinbox_deb.files
    assert "/usr/lib/spinbox/python/qemu/qmp/__init__.py" in spinbox_deb.files
    assert any(Path(f).name == "agent_pb2.py" for f in spinbox_deb.files), "no generated protobuf module"
    # protobuf's upb backend for the host's programs, outside the directory the guest image is built from.
    assert "/usr/lib/spinbox/host-python/google/_upb/_message.abi3.so" in spinbox_deb.files
    assert not [f for f in spinbox_deb.files if f.startswith("/usr/lib/spinbox/python/google/")]
