"""Debian's virtiofsd, started as spinboxd starts it (spinbox.daemon.fsuser), for real but without a
VM: it serves as a uid of its own in a user namespace that uid owns, keeps only the file
capabilities there, sees only the share, and even the host's uid 0 in its namespaces can write
no sysctl; a failed start is a named error."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spinbox.daemon import share
from spinbox.daemon.errors import Failed
from spinbox.daemon.fsuser import SHARE, FsUser
from spinbox.vm.handover import VmUser

VIRTIOFSD = share.find_virtiofsd()
# Far from the VMs' range (vm.uid_base) and from the users of the host.
UID = 0x7E000000 + 4242
NS_GET_OWNER_UID = 0xB704
SYS_CHROOT = 1 << 18
FILE_CAPS = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7)

pytestmark = pytest.mark.skipif(VIRTIOFSD is None, reason="no virtiofsd (qemu-system-common)")


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def ns_owner(pid: int) -> int:
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    try:
        owner = bytearray(4)
        fcntl.ioctl(fd, NS_GET_OWNER_UID, owner, True)
    finally:
        os.close(fd)
    return int.from_bytes(owner, "little")


def children(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(child) for child in result.stdout.split()]


def start(user: FsUser, argv: list[str], fds: tuple[int, ...]) -> tuple[subprocess.Popen[bytes], int]:
    """As ScopeSpawner starts a companion: the prefix, then a shell waiting for its go-ahead."""
    read_go, write_go = os.pipe()
    wait = 'read -r go || exit 97; exec </dev/null; exec "$@"'
    process = subprocess.Popen(
        [*user.prefix(), "/bin/sh", "-c", wait, "virtiofsd-test", *argv],
        stdin=read_go,
        pass_fds=fds,
        start_new_session=True,
        stderr=subprocess.PIPE,
    )
    os.close(read_go)
    return process, write_go


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[Path, socket.socket, socket.socket]]:
    directory = tmp_path / "share"
    directory.mkdir()
    listener, client = share.vhost_user_sockets(tmp_path)
    yield directory, listener, client
    listener.close()
    client.close()


def test_virtiofsd_serves_as_its_own_uid_with_file_capabilities_only_in_its_namespace(
    shared: tuple[Path, socket.socket, socket.socket],
) -> None:
    assert VIRTIOFSD is not None
    directory, listener, _client = shared
    (directory / "kept").write_text("the host's\n")
    root = directory.parent / "root"
    root.mkdir()
    user = FsUser(VmUser(UID, UID))
    fd = os.dup(listener.fileno())
    argv = user.wrap(share.virtiofsd_argv(VIRTIOFSD, SHARE, fd, sandbox="chroot"), root, directory)
    process, go = start(user, argv, (fd,))
    os.close(fd)
    try:
        asyncio.run(user.map_ids(process, 10))
        os.write(go, b"go\n")
        # virtiofsd accepts the queued connection, then forks the child that serves in its sandbox.
        deadline = time.monotonic() + 20
        while not (served := children(process.pid)):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "virtiofsd did not set up its sandbox"
            time.sleep(0.05)
        (server,) = served
        # Its sandbox is up once it has dropped SYS_CHROOT, its last step (after seccomp's).
        while status_of(server)["Seccomp"] != "2" or int(status_of(server)["CapPrm"], 16) & SYS_CHROOT:
            assert time.monotonic() < deadline, status_of(server)
            time.sleep(0.05)
        host_userns = os.stat("/proc/self/ns/user").st_ino
        for pid in (process.pid, server):
            status = status_of(pid)
            assert status["Uid"].split() == [str(UID)] * 4 and status["Gid"].split() == [str(UID)] * 4
            assert status["Groups"] == ""
            assert os.stat(f"/proc/{pid}/ns/user").st_ino != host_userns
            assert ns_owner(pid) == UID
            assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", "0", "4294967295"]
            assert Path(f"/proc/{pid}/gid_map").read_text().split() == ["0", "0", "4294967295"]
        status = status_of(server)
        assert len(status["NSpid"].split()) == 2  # its own PID namespace
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == FILE_CAPS, status
        assert int(status["CapBnd"], 16) == 0 and int(status["CapAmb"], 16) == 0, status
        assert status["NoNewPrivs"] == "1"
        for namespace in ("net", "mnt", "pid", "ipc"):
            assert os.readlink(f"/proc/{server}/ns/{namespace}") != os.readlink(f"/proc/self/ns/{namespace}")
        assert os.listdir(f"/proc/{server}/root") == ["kept"]
        assert_nothing_but_the_share_is_writable(server)
        assert root.exists() and not os.listdir(root)  # its root was built in its own mount namespace
    finally:
        os.close(go)
        os.killpg(process.pid, 9)
        process.wait()


# Run in virtiofsd's user and mount namespaces as their uid 0, the host's root uid.
PROBE = """
cat /proc/self/mountinfo
for f in /proc/sys/kernel/printk_ratelimit /proc/sysrq-trigger /usr/bin/env /probe; do
  (: 1<>"$f") 2>/dev/null && echo "writable $f" || echo "refused $f"
done
"""


def assert_nothing_but_the_share_is_writable(pid: int) -> None:
    """Its mount namespace holds a read-only root, /usr and proc, and the share: the host's uid 0
    there (which virtiofsd can take) can write no sysctl, no sysrq-trigger, nothing outside it."""
    probe = subprocess.run(
        ["nsenter", "-t", str(pid), "-U", "-m", "-p", "--", "sh", "-c", PROBE],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    mounts = {line.split()[4]: line.split()[5] for line in probe.stdout.splitlines() if " - " in line}
    assert set(mounts) == {"/", "/share", "/usr", "/proc"}, probe.stdout
    assert all(mounts[path].startswith("ro,") for path in ("/", "/usr", "/proc")), mounts
    assert mounts["/share"].startswith("rw,"), mounts
    for path in ("/proc/sys/kernel/printk_ratelimit", "/proc/sysrq-trigger", "/usr/bin/env", "/probe"):
        assert f"refused {path}" in probe.stdout, probe.stdout


def test_a_virtiofsd_that_gets_no_namespace_is_a_named_error() -> None:
    user = FsUser(VmUser(UID, UID))
    ended = subprocess.Popen(["sh", "-c", "exit 5"])
    ended.wait()
    with pytest.raises(Failed, match=r"virtiofsd ended \(status 5\) before it had a user namespace"):
        asyncio.run(user.map_ids(ended, 5))
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(Failed, match=r"within 0\.2 s \(timeouts\.virtiofsd_start\)"):
            asyncio.run(user.map_ids(sleeper, 0.2))
    finally:
        sleeper.kill()
        sleeper.wait()
