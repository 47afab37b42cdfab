"""Containers in VMs restored from spinboxd's templates (vm.boot = "template"),
with containerd 2.x (or 1.6 where 2.x is not installed)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spinbox.shim.spinboxd import vm_id_for
from spinbox.vm.qemu import SLOT_MAC
from tests.e2e.stack import (
    BUILDS,
    IMAGE,
    NOTHING_LEFT,
    RUNTIME,
    TEMPLATE_BUILD_TIMEOUT,
    TEMPLATES,
    Containerd,
    ready_templates,
    spinbox_stack,
    wait_for_default_template,
    wait_until_clean,
)
from tests.e2e.test_confinement import disk_of, qemu_of, status_of
from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import CONFIG

IDENTITY = (
    "cat /proc/sys/kernel/random/boot_id; od -An -tx1 -N32 /dev/urandom | tr -d ' \\n'; echo; date +%s; "
    "cat /proc/self/personality /proc/1/personality; cat /sys/class/net/eth0/address; "
    "ping -c 1 -W 10 $(ip route | awk '/^default/ {print $3}') >/dev/null && echo reached"
)


@pytest.fixture(scope="module")
def template_stack(systemd: PrivateSystemd, guest_image: Path) -> Iterator[PrivateSystemd]:
    with spinbox_stack(systemd, guest_image, boot="template"):
        yield systemd


@pytest.fixture(scope="module")
def containerd(template_stack: PrivateSystemd) -> Iterator[Containerd]:
    build = next((BUILDS[name] for name in ("2.x", "1.6") if BUILDS[name].available), None)
    if build is None:
        pytest.skip("no containerd is installed (tools/install-test-clients)")
    with Containerd.running(template_stack, build) as instance:
        yield instance


def boots(stack: PrivateSystemd, container_id: str) -> list[str]:
    """How spinboxd started the VMs of a container ("template" or "cold"), from its journal."""
    journal = stack.journal("-u", "spinbox.service", "-o", "cat")
    return re.findall(rf"VM default-{re.escape(container_id)} is running \(.*, (\w+) boot\)", journal)


def template_ram_of(stack: PrivateSystemd, pid: int) -> int:
    """The descriptor QEMU holds of the template's RAM (the memfd spinboxd sealed)."""
    fds = stack.path(f"/proc/{pid}/fd")
    for entry in sorted(os.listdir(fds), key=int):
        if os.readlink(fds / entry).startswith("/memfd:spinbox-template-"):
            return int(entry)
    raise AssertionError(f"QEMU {pid} holds no template RAM memfd")


def host_mac(stack: PrivateSystemd, vm_id: str) -> str:
    """The MAC of the interface the CNI network gave the VM's namespace on the host."""
    netns = f"/run/spinbox/netns/spinbox-{vm_id}"
    link = stack.run("nsenter", f"--net={netns}", "ip", "-o", "link", "show", "eth0").stdout
    found = re.search(r"link/ether ([0-9a-f:]{17})", link)
    assert found is not None, link
    return found.group(1)


def as_user(stack: PrivateSystemd, uid: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return stack.run("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd, check=False)


def test_restored_vms_are_confined_and_have_their_own_entropy_boot_id_and_clock(
    containerd: Containerd, template_stack: PrivateSystemd
) -> None:
    names = ["tpl-a", "tpl-b"]
    try:
        seen = []
        for name in names:
            containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, name, "sleep", "3600")
            assert boots(template_stack, name) == ["template"]
            result = containerd.ctr("task", "exec", "--exec-id", "id", name, "sh", "-c", IDENTITY)
            boot_id, random_hex, clock, *personalities, mac, reached = result.stdout.split()
            # The container's programs have a randomized address layout, as outside a VM.
            assert personalities == ["00000000", "00000000"]
            # The NIC in the template's slot took the MAC of the VM's own interface, and it carries
            # traffic (the gateway answered).
            assert mac == host_mac(template_stack, vm_id_for("default", name)) and mac != SLOT_MAC
            assert reached == "reached"
            assert re.fullmatch(r"[0-9a-f-]{36}", boot_id) and len(random_hex) == 64
            assert abs(int(clock) - time.time()) < 60, "the guest's clock is the host's"
            seen.append((boot_id, random_hex, mac))
        (boot_a, random_a, mac_a), (boot_b, random_b, mac_b) = seen
        assert boot_a != boot_b
        assert random_a != random_b
        assert mac_a != mac_b

        # Each restored VM's QEMU is confined as a cold-booted one is: a uid of its own, seccomp.
        pids = [qemu_of(template_stack, name) for name in names]
        uids = []
        for pid in pids:
            status = status_of(template_stack, pid)
            uid = status["Uid"].split()[0]
            assert uid != "0" and status["Gid"].split()[0] != "0"
            assert status["Seccomp"] == "2" and int(status["CapEff"], 16) == 0
            uids.append(uid)
        assert uids[0] != uids[1]
        # As the first QEMU's user: the second VM's disk cannot be opened, by path or descriptor ...
        fd, disk = disk_of(template_stack, pids[1])
        for path in (disk, f"/proc/{pids[1]}/fd/{fd}"):
            tried = as_user(template_stack, uids[0], "head", "-c", "1", path)
            assert tried.returncode != 0 and "Permission denied" in tried.stderr, (path, tried)
        # ... and the template's RAM, which it maps, cannot be written, punched or resized
        # through its own descriptor, nor opened in spinboxd's template directory.
        ram = f"/proc/{pids[0]}/fd/{template_ram_of(template_stack, pids[0])}"
        before = template_stack.run("sha256sum", ram).stdout.split()[0]
        attempts = [
            ("/usr/bin/python3", "-c", f"import os; os.pwrite(os.open({ram!r}, os.O_RDWR), b'x', 0)"),
            ("fallocate", "--punch-hole", "--offset", "0", "--length", "2MiB", ram),
            ("truncate", "--size", "0", ram),
        ]
        for attempt in attempts:
            tried = as_user(template_stack, uids[0], *attempt)
            assert tried.returncode != 0 and "Operation not permitted" in tried.stderr, (attempt, tried)
        assert template_stack.run("sha256sum", ram).stdout.split()[0] == before
        for template in ready_templates(template_stack):
            tried = as_user(template_stack, uids[0], "head", "-c", "1", f"{TEMPLATES}/{template}/ram")
            assert tried.returncode != 0 and "Permission denied" in tried.stderr, tried
        # No restored guest reports free pages into the template's RAM (QEMU's discard would fail).
        for name in names:
            lines = template_stack.journal(f"SPINBOX_VM={vm_id_for('default', name)}", "-o", "cat")
            assert "ram_block_discard_range" not in lines
    finally:
        for name in names:
            containerd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
            containerd.ctr("task", "delete", "-f", name, check=False)
            containerd.ctr("containers", "delete", name, check=False)
    assert wait_until_clean(template_stack, containerd) == NOTHING_LEFT


def memfd_holders(stack: PrivateSystemd, name: str) -> list[int]:
    """The processes that hold a descriptor of the memfd `name`."""
    holders = []
    for entry in stack.path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:  # it ended, or is a kernel thread
            continue
        if any(link.startswith(f"/memfd:{name} ") or link == f"/memfd:{name}" for link in links):
            holders.append(int(entry.name))
    return holders


def template_ram(stack: PrivateSystemd, pid: int) -> tuple[str, str, str]:
    """QEMU's descriptor of the template's RAM: the memfd's name, its inode and the sha256 of its bytes."""
    fd = f"/proc/{pid}/fd/{template_ram_of(stack, pid)}"
    name = os.readlink(stack.path(fd)).removeprefix("/memfd:").removesuffix(" (deleted)")
    inode = stack.run("stat", "-L", "-c", "%i", fd).stdout.strip()
    return name, inode, stack.run("sha256sum", fd).stdout.split()[0]


def test_rebuilding_the_template_leaves_running_containers_alone(
    containerd: Containerd, template_stack: PrivateSystemd, guest_image: Path
) -> None:
    # The container holds 8 MiB of random bytes in its guest's memory (a tmpfs) and their checksum.
    hold = "head -c 8388608 /dev/urandom > /dev/shm/held && sha256sum /dev/shm/held > /held.sum"
    loop = f"{hold}; trap 'exit 0' TERM; while :; do sleep 0.1; done"
    check = "sha256sum -c /held.sum && cat /held.sum"
    spinboxd = int(template_stack.unit_property("spinbox.service", "MainPID"))
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "tpl-old", "sh", "-c", loop)
    try:
        assert boots(template_stack, "tpl-old") == ["template"]
        qemu = qemu_of(template_stack, "tpl-old")
        ram = template_ram(template_stack, qemu)
        # The template tpl-old was restored from; others (of other sizes) may be ready beside it
        # when the whole tier runs with templates.
        old = ram[0].removeprefix("spinbox-template-")
        shape = old.rsplit("-", 1)[0]

        def of_its_shape() -> list[str]:
            return [name for name in ready_templates(template_stack) if name.rsplit("-", 1)[0] == shape]

        assert of_its_shape() == [old]
        template_stack.wait_for(
            "tpl-old's checksum",
            lambda: containerd.ctr(
                "task", "exec", "--exec-id", "sum0", "tpl-old", "cat", "/held.sum", check=False
            ).stdout.endswith("/dev/shm/held\n"),
            timeout=60,
        )
        held = containerd.ctr("task", "exec", "--exec-id", "sum1", "tpl-old", "sh", "-c", check).stdout
        assert spinboxd in memfd_holders(template_stack, ram[0])

        # A new guest image (here: its modification time) makes the template stale: the next
        # VM boots cold and spinboxd builds a new template, then removes the old one.
        stat = guest_image.stat()
        os.utime(guest_image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        cold = containerd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "tpl-cold", "echo", "cold")
        assert cold.stdout == "cold\n"
        assert boots(template_stack, "tpl-cold") == ["cold"]
        template_stack.wait_for(
            "the rebuilt template",
            lambda: of_its_shape() not in ([], [old]),
            TEMPLATE_BUILD_TIMEOUT,
        )
        (new,) = of_its_shape()
        # The old template's files are gone (no VM maps them: restored VMs map the sealed memfd) ...
        assert not template_stack.path(f"{TEMPLATES}/{old}").exists()

        # ... while the container restored from it works on: its QEMU, its memory, the template's
        # RAM it maps (the same memfd, unchanged), which spinboxd no longer holds.
        fed = containerd.ctr("task", "exec", "--exec-id", "e1", "tpl-old", "cat", input="still here\n")
        assert fed.stdout == "still here\n"
        assert (
            containerd.ctr("task", "exec", "--exec-id", "sum2", "tpl-old", "sh", "-c", check).stdout == held
        )
        assert qemu_of(template_stack, "tpl-old") == qemu
        assert template_ram(template_stack, qemu) == ram
        assert memfd_holders(template_stack, ram[0]) == [qemu]

        # A new container comes from the new template, and maps its RAM.
        containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "tpl-new", "sleep", "3600")
        try:
            assert boots(template_stack, "tpl-new") == ["template"]
            fresh = containerd.ctr("task", "exec", "--exec-id", "new", "tpl-new", "echo", "new")
            assert fresh.stdout == "new\n"
            assert (
                template_ram(template_stack, qemu_of(template_stack, "tpl-new"))[0]
                == f"spinbox-template-{new}"
            )
        finally:
            containerd.ctr("task", "kill", "-s", "SIGKILL", "tpl-new", check=False)
            containerd.ctr("task", "delete", "-f", "tpl-new", check=False)
            containerd.ctr("containers", "delete", "tpl-new", check=False)

        containerd.ctr("task", "kill", "-s", "TERM", "tpl-old")
        template_stack.wait_for(
            "tpl-old to stop", lambda: containerd.tasks() == {"tpl-old": "STOPPED"}, timeout=120
        )
    finally:
        containerd.ctr("task", "delete", "--force", "tpl-old", check=False)
        containerd.ctr("container", "delete", "tpl-old", check=False)
    assert wait_until_clean(template_stack, containerd) == NOTHING_LEFT
    # The old template's RAM went with the last VM that mapped it.
    assert memfd_holders(template_stack, f"spinbox-template-{old}") == []


def test_devices_beyond_a_template_s_slots_are_hot_plugged(
    containerd: Containerd, template_stack: PrivateSystemd
) -> None:
    # One disk slot and, with networking off, no NIC slot: the container's layer goes into the
    # slot, its writable disk is hot-plugged after the restore. (Another VM size than the other
    # tests' keeps their template.)
    config = template_stack.path(CONFIG).read_text()
    template_stack.write_file(
        CONFIG,
        config.replace("[vm]\n", "[vm]\nmemory_mib = 384\ntemplate_disk_slots = 1\n")
        + "\n[network]\nenabled = false\n",
    )
    try:
        template_stack.systemctl("restart", "spinbox.service")
        wait_for_default_template(template_stack)
        script = "echo kept > /kept && cat /kept && ls /sys/class/net && cat /sys/class/net/lo/flags"
        result = containerd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "tpl-slots", "sh", "-c", script)
        assert boots(template_stack, "tpl-slots") == ["template"]
        # Its writable layer works; the guest has no NIC at all, not even the template's, and its
        # loopback is up (IFF_UP | IFF_LOOPBACK).
        assert result.stdout.split() == ["kept", "lo", "0x9"]
    finally:
        template_stack.write_file(CONFIG, config)
        template_stack.systemctl("restart", "spinbox.service")
        wait_for_default_template(template_stack)
    assert wait_until_clean(template_stack, containerd) == NOTHING_LEFT
