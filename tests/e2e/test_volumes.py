"""Host directories and files shared into spinbox containers over virtio-fs.

ctr's --mount (containerd 1.6 and 2.x), nerdctl's named volumes and a CRI
pod's emptyDir and configMap-style volume: changes are live both ways,
read-only mounts stay read-only on the host whatever the guest remounts, a
read-only bind of a tree leaves its submounts their own flags (as runc does),
owners and modes are the host's, virtiofsd holds no capability of the host's
and no device node can be made through a volume, a mount a VM cannot give
fails the create with a sentence, and nothing (no virtiofsd, no mount, no
share directory) is left after a delete.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator

import pytest

from spinbox.shim.spinboxd import vm_id_for
from tests.e2e.stack import (
    BUILDS,
    CRICTL,
    IMAGE,
    NERDCTL,
    NOTHING_LEFT,
    RUNTIME,
    Containerd,
    CriContainerd,
    wait_until_clean,
)
from tests.harness.systemd import PrivateSystemd

# Under /etc, which is an overlay private to the test's systemd.
HOST_DIR = "/etc/spinbox-e2e-volumes"
CRI_WORK = "/run/spinbox-e2e-volumes"
GIB = 1 << 30


def preferred_build() -> str:
    """containerd 2.x where installed (nerdctl needs it), else Debian's 1.6."""
    return "2.x" if BUILDS["2.x"].available else "1.6"


def eventually(what: str, read: Callable[[], object], expected: object, timeout: float = 60) -> None:
    """`read()` returns `expected` within `timeout` (execs in a TCG guest take seconds each)."""
    deadline = time.monotonic() + timeout
    while (found := read()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout:g}s; last read {found!r}")
        time.sleep(0.3)


def exec_in(containerd: Containerd, container: str, script: str, exec_id: str) -> tuple[int, str]:
    result = containerd.ctr("task", "exec", "--exec-id", exec_id, container, "sh", "-c", script, check=False)
    return result.returncode, result.stdout + result.stderr


def status_of(stack: PrivateSystemd, pid: int) -> dict[str, str]:
    lines = stack.path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


# Capability numbers (include/uapi/linux/capability.h) and ioctl_ns(2)'s NS_GET_OWNER_UID.
CAP = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "SETGID": 6, "SETUID": 7}
NS_GET_OWNER_UID = 0xB704


def assert_virtiofsd_confined(stack: PrivateSystemd, container: str) -> None:
    """The VM's virtiofsd (and the process that waits for it): a uid of its own, neither root's
    nor QEMU's, capabilities only in a user namespace that uid owns, with the identity maps
    spinboxd wrote, in namespaces of its own where even the host's uid 0 writes nothing but the
    share (tests/integration/daemon/test_virtiofsd_user.py shows the same without a VM)."""
    vm_id = vm_id_for("default", container)
    (qemu,) = stack.processes(f"process=spinbox-vm-{vm_id} ")
    scope = stack.path(f"/proc/{qemu}/cgroup").read_text()
    pids = [
        pid
        for pid in stack.processes("virtiofsd")
        if pid != qemu and stack.path(f"/proc/{pid}/cgroup").read_text() == scope
    ]
    assert len(pids) == 2, pids
    qemu_uid = status_of(stack, qemu)["Uid"].split()[0]
    host_userns = os.stat(stack.path("/proc/1/ns/user")).st_ino
    statuses = {pid: status_of(stack, pid) for pid in pids}
    (server,) = [pid for pid, status in statuses.items() if status["Name"] == "virtiofsd"]
    for pid, status in statuses.items():
        uids, gids = set(status["Uid"].split()), set(status["Gid"].split())
        assert len(uids) == 1 and len(gids) == 1 and "0" not in uids | gids, status
        assert uids != {qemu_uid}, (status, qemu_uid)
        assert status["Groups"] == "", status
        assert stack.path(f"/proc/{pid}/uid_map").read_text().split() == ["0", "0", "4294967295"]
        assert stack.path(f"/proc/{pid}/gid_map").read_text().split() == ["0", "0", "4294967295"]
        assert os.stat(stack.path(f"/proc/{pid}/ns/user")).st_ino != host_userns
        fd = os.open(stack.path(f"/proc/{pid}/ns/user"), os.O_RDONLY)
        try:
            owner = bytearray(4)
            fcntl.ioctl(fd, NS_GET_OWNER_UID, owner, True)
        finally:
            os.close(fd)
        assert {str(int.from_bytes(owner, "little"))} == uids
    status = statuses[server]
    wanted = sum(1 << bit for bit in CAP.values())
    # The file capabilities, in its namespace only: no MKNOD, SETFCAP, SYS_ADMIN or any other.
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == wanted, status
    assert int(status["CapBnd"], 16) == 0 and int(status["CapAmb"], 16) == 0, status
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", status
    assert len(status["NSpid"].split()) == 2, status
    # As its namespaces' uid 0 (the host's root uid, which virtiofsd can take): all is read-only
    # but the share.
    probe = stack.run("nsenter", "-t", str(server), "-U", "-m", "-p", "--", "sh", "-c", PROBE).stdout
    fields = [line.split() for line in probe.splitlines() if " - " in line]
    # (The volumes are mounts below /share.)
    mounts = {field[4]: field[5][:3] for field in fields if not field[4].startswith("/share/")}
    assert mounts == {"/": "ro,", "/usr": "ro,", "/proc": "ro,", "/share": "rw,"}, probe
    assert probe.count("refused") == 4, probe


# Run in virtiofsd's namespaces: its mounts, and what its uid 0 may open for writing.
PROBE = """
cat /proc/self/mountinfo
for f in /proc/sys/kernel/printk_ratelimit /proc/sysrq-trigger /usr/bin/env /probe; do
  (: 1<>"$f") 2>/dev/null && echo "writable $f" || echo "refused $f"
done
"""


# As the container's root: owners, modes, a setgid directory, a FIFO, and device nodes.
AS_ROOT = """
set -e
mkdir /rw/own && cd /rw/own
echo r > by-root && chmod 640 by-root
echo c > chowned && chown 1234:2345 chowned && chmod 4755 chowned
mkdir shared && chown 0:3456 shared && chmod 2777 shared
mkfifo fifo
mknod blk b 8 0 2>&1 || echo block-refused
mknod chr c 1 3 2>&1 || echo char-refused
"""
# As uid 1000, gid 1001: its files take the setgid directory's group; root's file and directory
# refuse it.
AS_USER = """
cd /rw/own
mkdir shared/dir-by-user && echo s > shared/file-by-user && echo made
echo x >> by-root 2>&1 || echo append-refused
touch new-in-roots-dir 2>&1 || echo create-refused
"""


def assert_owners_modes_and_devices(
    containerd: Containerd, stack: PrivateSystemd, name: str, rw: str
) -> None:
    stack.run("rm", "-rf", f"{rw}/own")  # the other containerd's run
    code, out = exec_in(containerd, name, AS_ROOT, "own1")
    assert code == 0, out
    assert "block-refused" in out and "char-refused" in out, out
    assert "Operation not permitted" in out, out
    result = containerd.ctr(
        "task", "exec", "--exec-id", "own2", "--user", "1000:1001", name, "sh", "-c", AS_USER, check=False
    )
    out = result.stdout + result.stderr
    assert "made" in out and "append-refused" in out and "create-refused" in out, out

    def owner(path: str) -> tuple[int, int, int]:
        info = os.lstat(stack.path(f"{rw}/own/{path}"))
        return info.st_uid, info.st_gid, info.st_mode

    assert owner("by-root") == (0, 0, stat.S_IFREG | 0o640)
    assert owner("chowned") == (1234, 2345, stat.S_IFREG | 0o4755)
    assert owner("shared") == (0, 3456, stat.S_IFDIR | 0o2777)
    assert stat.S_ISFIFO(owner("fifo")[2])
    assert not stack.path(f"{rw}/own/blk").exists() and not stack.path(f"{rw}/own/chr").exists()
    # uid 1000's files; a setgid directory's group and (for directories) its setgid bit are inherited.
    assert owner("shared/dir-by-user") == (1000, 3456, stat.S_IFDIR | 0o2755)
    assert owner("shared/file-by-user") == (1000, 3456, stat.S_IFREG | 0o644)
    assert stack.path(f"{rw}/own/by-root").read_text() == "r\n"
    assert not stack.path(f"{rw}/own/new-in-roots-dir").exists()


@pytest.fixture(scope="module", params=["1.6", "2.x"])
def containerd(request: pytest.FixtureRequest, stack: PrivateSystemd) -> Iterator[Containerd]:
    build = BUILDS[request.param]
    if not build.available:
        pytest.skip(f"containerd {build.name} is not installed")
    with Containerd.running(stack, build) as instance:
        yield instance


def test_ctr_volumes_are_live_both_ways_and_read_only_ones_stay_read_only_on_the_host(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    rw, ro = f"{HOST_DIR}/rw", f"{HOST_DIR}/ro"
    stack.run("mkdir", "-p", rw, ro)
    stack.write_file(f"{ro}/kept", "read-only content\n")
    stack.write_file(f"{HOST_DIR}/file", "a single file\n")
    name = "vol-" + containerd.build.name.replace(".", "")
    tree, tmpfs_names = make_tree_with_submounts(stack, name)
    containerd.ctr(
        "run", "-d", "--privileged", "--runtime", RUNTIME,
        "--mount", f"type=bind,src={rw},dst=/rw,options=rbind:rw",
        "--mount", f"type=bind,src={ro},dst=/ro,options=rbind:ro",
        "--mount", f"type=bind,src={HOST_DIR}/file,dst=/etc/single,options=bind:ro",
        "--mount", f"type=bind,src={tree},dst=/tree,options=rbind:ro",
        "--mount", f"type=bind,src={tree},dst=/rtree,options=rbind:rro",
        IMAGE, name, "sleep", "600",
    )  # fmt: skip
    try:
        # The container's write is on the host while the container runs.
        code, out = exec_in(containerd, name, "echo from-the-container > /rw/out", "w1")
        assert code == 0, out
        assert stack.path(f"{rw}/out").read_text() == "from-the-container\n"
        # The host's write is seen by the running container.
        stack.write_file(f"{rw}/in", "from-the-host\n")
        eventually(
            "the host's file in the container",
            lambda: exec_in(containerd, name, "cat /rw/in", "r1"),
            (0, "from-the-host\n"),
        )
        code, out = exec_in(containerd, name, "cat /etc/single /ro/kept", "r2")
        assert (code, out) == (0, "a single file\nread-only content\n")
        # Read-only: EROFS, and still so after the guest remounts it read-write.
        code, out = exec_in(containerd, name, "echo x > /ro/new", "w2")
        assert code != 0 and "Read-only file system" in out, out
        code, out = exec_in(containerd, name, "mount -o remount,rw /ro && echo remounted", "m1")
        assert "remounted" in out, out
        code, out = exec_in(containerd, name, "echo x > /ro/new; echo x >> /ro/kept", "w3")
        assert code != 0, out
        assert not stack.path(f"{ro}/new").exists()
        assert stack.path(f"{ro}/kept").read_text() == "read-only content\n"
        assert_virtiofsd_confined(stack, name)
        assert_owners_modes_and_devices(containerd, stack, name, rw)
        check_tree_with_submounts(containerd, stack, name, tree)
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", name, check=False)
        time.sleep(1)
        containerd.ctr("task", "delete", "-f", name, check=False)
        containerd.ctr("containers", "delete", name, check=False)
        remove_tree(stack, tree)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT
    # Nothing holds the tree's tmpfs mounts once the container is gone.
    sources = stack.run("findmnt", "-rn", "-o", "SOURCE").stdout.split()
    assert [s for s in sources if s in tmpfs_names] == []


def make_tree_with_submounts(stack: PrivateSystemd, name: str) -> tuple[str, tuple[str, str]]:
    """A host directory with a writable tmpfs at tmpfs/ and a read-only one at rosub/."""
    tree = f"{HOST_DIR}/tree"
    writable, read_only = f"spinbox-e2e-{name}-rw", f"spinbox-e2e-{name}-ro"
    remove_tree(stack, tree)
    stack.run("mkdir", "-p", f"{tree}/tmpfs", f"{tree}/rosub")
    stack.run("mount", "-t", "tmpfs", "-o", "size=1m", writable, f"{tree}/tmpfs")
    stack.run("mount", "-t", "tmpfs", "-o", "size=1m", read_only, f"{tree}/rosub")
    stack.write_file(f"{tree}/rosub/kept", "kept\n")
    stack.run("mount", "-o", "remount,ro", f"{tree}/rosub")
    return tree, (writable, read_only)


def remove_tree(stack: PrivateSystemd, tree: str) -> None:
    for sub in ("tmpfs", "rosub"):
        stack.run("umount", "-l", f"{tree}/{sub}", check=False)
    stack.run("rm", "-rf", tree)


def check_tree_with_submounts(containerd: Containerd, stack: PrivateSystemd, name: str, tree: str) -> None:
    """A read-only, not recursively read-only, bind of a tree (runc's semantics): its top is
    read-only, a writable submount writable, a read-only one read-only; with rro all are
    read-only; the host can unmount the submounts and remove the tree while the container
    runs (as critest's cleanup does)."""
    code, out = exec_in(containerd, name, "touch /tree/top", "t1")
    assert code != 0 and "Read-only file system" in out, out
    code, out = exec_in(
        containerd, name, "echo in-the-tmpfs > /tree/tmpfs/file && cat /tree/rosub/kept", "t2"
    )
    assert (code, out) == (0, "kept\n")
    assert stack.path(f"{tree}/tmpfs/file").read_text() == "in-the-tmpfs\n"
    code, out = exec_in(containerd, name, "touch /tree/rosub/new", "t3")
    assert code != 0 and "Read-only file system" in out, out
    # Recursively read-only (rro): the writable submount too.
    code, out = exec_in(containerd, name, "cat /rtree/tmpfs/file && touch /rtree/tmpfs/new", "t6")
    assert code != 0 and out.startswith("in-the-tmpfs\n") and "Read-only file system" in out, out
    assert not stack.path(f"{tree}/tmpfs/new").exists()
    # The host keeps the top read-only whatever the guest remounts.
    code, out = exec_in(containerd, name, "mount -o remount,rw /tree && echo remounted", "t4")
    assert "remounted" in out, out
    code, out = exec_in(containerd, name, "touch /tree/top", "t5")
    assert code != 0 and not stack.path(f"{tree}/top").exists(), out
    stack.run("umount", "-l", f"{tree}/tmpfs")
    stack.run("umount", "-l", f"{tree}/rosub")
    stack.run("rm", "-rf", tree)


def test_a_socket_or_device_bind_fails_the_create_naming_the_mount(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    socket_path = f"{HOST_DIR}/app.sock"
    stack.run("mkdir", "-p", HOST_DIR)
    stack.run("rm", "-f", socket_path)
    stack.run("python3", "-c", f"import socket; socket.socket(socket.AF_UNIX).bind({socket_path!r})")
    for source, kind in ((socket_path, "a socket"), ("/dev/null", "a device node")):
        result = containerd.ctr(
            "run", "--rm", "--runtime", RUNTIME,
            "--mount", f"type=bind,src={source},dst=/mnt/x,options=rbind",
            IMAGE, "vol-bad", "true",
            check=False,
        )  # fmt: skip
        assert result.returncode != 0
        assert f"bind mount of {source} at /mnt/x: the source is {kind}" in result.stderr, result.stderr
        containerd.ctr("containers", "delete", "vol-bad", check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


# A 1 MiB block of numbered lines: the 20,000 lines (208,890 bytes) six times over, cut.
BLOCK_SIZE = 1048560
BLOCK_SCRIPT = (
    "i=0; while [ $i -lt 20000 ]; do echo line $i; i=$((i+1)); done > /tmp/lines; "
    "cat /tmp/lines /tmp/lines /tmp/lines /tmp/lines /tmp/lines /tmp/lines | head -c 1048560 > /tmp/block; "
    "test $(stat -c %s /tmp/block) = 1048560; "
)


def gib_blocks() -> Iterator[bytes]:
    """The GiB the guest writes: 1024 times the block followed by its number on 16 bytes."""
    block = ("".join(f"line {i}\n" for i in range(20000)) * 6).encode()[:BLOCK_SIZE]
    assert len(block) == BLOCK_SIZE
    for i in range(1024):
        yield block + f"{i:015d}\n".encode()


# ctr's own deadline (900 s) ends the run first, with its output, on a host too loaded for the GiB.
@pytest.mark.timeout(1200)
def test_a_gib_written_through_a_volume_arrives_intact_and_a_full_one_fails_the_write(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    if containerd.build.name != preferred_build():
        pytest.skip("one containerd build is enough for the data path")
    out_dir, full_dir = f"{HOST_DIR}/big", f"{HOST_DIR}/full"
    stack.run("mkdir", "-p", out_dir, full_dir)
    # A host filesystem with room for 4 MiB: the guest's 5 MiB write must fail, loudly.
    stack.run("mount", "-t", "tmpfs", "-o", "size=4m", "spinbox-e2e-full", full_dir)
    # Not sparse: every block ends with its own number. `set -e`: a failed write fails the run.
    script = (
        "set -e; "
        + BLOCK_SCRIPT
        + "if cat /tmp/block /tmp/block /tmp/block /tmp/block /tmp/block > /full/spill; "
        "then echo spill-fitted; else echo spill-refused; fi; "
        "i=0; while [ $i -lt 1024 ]; do cat /tmp/block; printf '%015d\\n' $i; i=$((i+1)); done > /out/big; "
        "sync; stat -c %s /out/big"
    )
    try:
        started = time.monotonic()
        result = containerd.ctr(
            "run", "--rm", "--runtime", RUNTIME,
            "--mount", f"type=bind,src={out_dir},dst=/out,options=rbind:rw",
            "--mount", f"type=bind,src={full_dir},dst=/full,options=rbind:rw",
            IMAGE, "vol-big", "sh", "-c", script,
            check=False, timeout=900,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        print(f"1 GiB through a volume: {elapsed:.1f} s with the VM's boot ({1024 / elapsed:.1f} MiB/s)")
        assert result.returncode == 0, result.stderr[-2000:]
        # The full volume: the guest's write failed with the host's error, and said so.
        assert result.stdout.split() == ["spill-refused", str(GIB)], result.stdout
        assert "No space left on device" in result.stderr, result.stderr[-2000:]
        expected = hashlib.sha256()
        for chunk in gib_blocks():
            expected.update(chunk)
        digest = hashlib.sha256()
        with stack.path(f"{out_dir}/big").open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        assert digest.hexdigest() == expected.hexdigest()
    finally:
        # Gone already after `ctr run --rm`; still there when ctr's deadline ended the run.
        containerd.ctr("task", "kill", "-s", "KILL", "vol-big", check=False)
        containerd.ctr("task", "delete", "-f", "vol-big", check=False)
        containerd.ctr("containers", "delete", "vol-big", check=False)
        stack.run("rm", "-f", f"{out_dir}/big")
        stack.run("umount", full_dir, check=False)
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def test_nerdctl_named_volume_keeps_what_the_first_container_wrote(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    if containerd.build.name == "1.6":
        pytest.skip("nerdctl v2 needs containerd 1.7 or newer")
    if not NERDCTL.exists():
        pytest.skip("nerdctl is not installed (tools/install-test-clients)")
    containerd.nerdctl("volume", "rm", "-f", "spinbox-e2e-vol", check=False)
    try:
        first = containerd.nerdctl(
            "run", "--rm", "--runtime", RUNTIME, "-v", "spinbox-e2e-vol:/data", IMAGE,
            "sh", "-c", "echo written-by-the-first > /data/note",
            check=False,
        )  # fmt: skip
        assert first.returncode == 0, first.stderr
        second = containerd.nerdctl(
            "run", "--rm", "--runtime", RUNTIME, "-v", "spinbox-e2e-vol:/data", IMAGE, "cat", "/data/note",
            check=False,
        )  # fmt: skip
        assert (second.returncode, second.stdout) == (0, "written-by-the-first\n"), second.stderr
    finally:
        containerd.nerdctl("volume", "rm", "-f", "spinbox-e2e-vol", check=False)
        # nerdctl v2.1 leaves its client-side FIFOs behind, with runc as well.
        stack.run("sh", "-c", "rm -rf /run/containerd/fifo/*")
    assert wait_until_clean(stack, containerd) == NOTHING_LEFT


def task_stopped(containerd: Containerd, name: str) -> bool:
    return containerd.tasks().get(name) in ("STOPPED", None)


def crash(stack: PrivateSystemd, name: str) -> None:
    """SIGKILL the container's shim, or spinboxd and QEMU together (spinboxd restarts)."""
    if name == "vol-shim-kill":
        (shim,) = stack.processes(f"containerd-shim-spinbox-v1 .*-id {name}")
        stack.run("kill", "-KILL", str(shim))
        return
    started = stack.unit_property("spinbox.service", "ExecMainStartTimestampMonotonic")
    stack.systemctl("kill", "--kill-who=main", "--signal=KILL", "spinbox.service")
    for pid in stack.processes("qemu-system"):
        stack.run("kill", "-KILL", str(pid), check=False)
    stack.wait_for(
        "spinboxd restarted",
        lambda: (
            stack.unit_property("spinbox.service", "ExecMainStartTimestampMonotonic") != started
            and stack.unit_property("spinbox.service", "ActiveState") == "active"
        ),
        timeout=60,
    )


def test_volumes_are_released_after_a_sigkill_of_the_shim_or_of_spinboxd_and_qemu(
    containerd: Containerd, stack: PrivateSystemd
) -> None:
    if containerd.build.name != preferred_build():
        pytest.skip("one containerd build is enough for the crash paths")
    data = f"{HOST_DIR}/crash"
    stack.run("mkdir", "-p", data)
    stack.write_file(f"{data}/keep", "user data\n")
    for name in ("vol-shim-kill", "vol-daemon-kill"):
        containerd.ctr(
            "run", "-d", "--runtime", RUNTIME,
            "--mount", f"type=bind,src={data},dst=/data,options=rbind:rw",
            IMAGE, name, "sleep", "600",
        )  # fmt: skip
        try:
            assert stack.processes("virtiofsd")
            crash(stack, name)
            stack.wait_for("the task to stop", functools.partial(task_stopped, containerd, name), timeout=120)
        finally:
            containerd.ctr("task", "delete", name, check=False)
            containerd.ctr("container", "delete", name, check=False)
            stack.run("sh", "-c", f"rm -rf $(dirname /run/containerd/fifo/*/{name}-stdout)", check=False)
        assert wait_until_clean(stack, containerd) == NOTHING_LEFT
        # The volume was unmounted, never removed through.
        assert stack.path(f"{data}/keep").read_text() == "user data\n"


def write_config_map(stack: PrivateSystemd, directory: str, version: str, value: str) -> None:
    """A configMap volume as the kubelet writes it: a timestamped directory, `..data` pointing
    at it (swapped atomically by a rename), and each key a link through `..data`."""
    stack.write_file(f"{directory}/..{version}/key", value)
    stack.run(
        "sh", "-c",
        f"cd {directory} && ln -sfn ..{version} ..data_tmp && mv -T ..data_tmp ..data && "
        "{ test -L key || ln -s ..data/key key; }",
    )  # fmt: skip


@pytest.mark.parametrize("build", ["1.6", "2.x"])
def test_cri_pod_containers_share_an_empty_dir_and_see_a_config_map_change(
    stack: PrivateSystemd, build: str
) -> None:
    if not CRICTL.exists():
        pytest.skip("crictl is not installed (tools/install-test-clients)")
    if not BUILDS[build].available:
        pytest.skip(f"containerd {build} is not installed")
    cri = CriContainerd(stack, BUILDS[build])
    cri.start()
    pod = ""
    work = f"{CRI_WORK}/{build}"
    try:
        empty_dir, config_map = f"{work}/empty-dir", f"{work}/config-map"
        stack.run("mkdir", "-p", empty_dir, config_map, f"{work}/logs")
        write_config_map(stack, config_map, "2026_12_06_1", "first\n")
        pod_config = f"{work}/pod.json"
        stack.write_file(
            pod_config,
            json.dumps(
                {
                    "metadata": {
                        "name": "volumes-" + build.replace(".", ""),
                        "namespace": "default",
                        "uid": "volumes-uid-" + build.replace(".", ""),
                        "attempt": 0,
                    },
                    "log_directory": f"{work}/logs",
                    "linux": {},
                }
            ),
        )
        mounts = [
            {"container_path": "/cache", "host_path": empty_dir},
            {"container_path": "/config", "host_path": config_map, "readonly": True},
        ]
        containers = []
        for name, command in (
            ("writer", "echo from-the-writer > /cache/note; exec sleep 2147483647"),
            ("reader", "exec sleep 2147483647"),
        ):
            config = f"{work}/{name}.json"
            stack.write_file(
                config,
                json.dumps(
                    {
                        "metadata": {"name": name},
                        "image": {"image": IMAGE},
                        "command": ["sh", "-c", command],
                        "mounts": mounts,
                        "log_path": f"{name}.log",
                    }
                ),
            )
            containers.append((name, config))
        pod = cri.crictl("runp", "--runtime", "spinbox", pod_config).stdout.strip()
        ids = {}
        for name, config in containers:
            ids[name] = cri.crictl("create", pod, config, pod_config).stdout.strip()
            cri.crictl("start", ids[name])

        def in_reader(script: str) -> str:
            result = cri.crictl("exec", "-s", ids["reader"], "sh", "-c", script, check=False)
            # crictl's exec -s adds blank lines to the output.
            return (
                result.stdout.strip()
                if result.returncode == 0
                else f"exit {result.returncode}: {result.stderr}"
            )

        eventually("the writer's file in the reader", lambda: in_reader("cat /cache/note"), "from-the-writer")
        assert stack.path(f"{empty_dir}/note").read_text() == "from-the-writer\n"
        assert in_reader("cat /config/key") == "first"
        write_config_map(stack, config_map, "2026_12_06_2", "second\n")
        eventually("the configMap's new value", lambda: in_reader("cat /config/key"), "second")
        denied = cri.crictl("exec", "-s", ids["reader"], "sh", "-c", "echo x > /config/new", check=False)
        assert "Read-only" in denied.stdout + denied.stderr
    finally:
        if pod:
            cri.crictl("stopp", pod, check=False)
            cri.crictl("rmp", pod, check=False)
        try:
            eventually(
                "the pod's VM and share to go", lambda: stack.processes("virtiofsd|qemu-system"), [], 120
            )
            found = [
                t
                for t in stack.run("findmnt", "-rn", "-o", "TARGET").stdout.split()
                if t.startswith("/run/spinbox/")
            ]
            assert found == []
            assert not list(stack.path("/run/spinbox/vm").glob("*"))
        finally:
            cri.stop()
