"""A running VM's QEMU is confined: its own uid, seccomp, and no way to another VM's files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from spinbox.vm import VirtualMachine, launch
from spinbox.vm.spec import Disk
from tests.integration.vm.test_vm_boot import make_spec, run
from tests.integration.vm.test_vm_boot import test_image as test_image  # the fixture


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def fd_of(pid: int, path: Path) -> int:
    """The descriptor through which process pid holds path open."""
    for entry in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{entry}") == str(path):
            return int(entry)
    raise AssertionError(f"process {pid} does not hold {path} open")


def try_as(uid: int, gid: int, code: str) -> str:
    """Run Python code as uid:gid (no groups, no capabilities), as QEMU runs; its output."""
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all"]
    argv += ["--", "/usr/bin/python3", "-I", "-c", code]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


OPEN = """
import sys
for path in sys.argv[1:]:
    try:
        open(path, "rb").close()
        print("opened", path)
    except OSError as error:
        print("refused", error.errno, path)
"""


def test_qemu_runs_as_its_own_user_under_seccomp_and_cannot_open_another_vms_disk(
    test_image: Path,
    tmp_path: Path,
) -> None:
    # The disks' directories are open to everyone: only the images' own modes
    # (root's, 0600, as spinboxd makes them) and the uids stand in the way.
    tmp_path.chmod(0o755)
    disks = {}
    for name in ("a", "b"):
        disk = tmp_path / f"{name}.img"
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        disk.chmod(0o600)
        disks[name] = disk

    async def scenario() -> None:
        vms: dict[str, VirtualMachine] = {}
        try:
            for name in ("a", "b"):
                spec = make_spec(
                    test_image,
                    tmp_path / f"vm-{name}",
                    vm_id=f"confined-{name}",
                    disks=(Disk(disks[name], f"disk-{name}", read_only=False),),
                )
                vms[name] = await launch(spec)
            a, b = vms["a"], vms["b"]
            assert await a.status() == "running" and await b.status() == "running"
            ids = {}
            for name, vm in vms.items():
                status = status_fields(vm.pid)
                uid, gid = int(status["Uid"].split()[0]), int(status["Gid"].split()[0])
                assert uid != 0 and gid != 0, status["Uid"]
                assert set(status["Uid"].split()) == {str(uid)}  # real, effective, saved, fs
                assert status["Seccomp"] == "2"
                assert status["NoNewPrivs"] == "1"
                assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
                assert int(status["CapBnd"], 16) == 0
                assert status["Groups"] == ""
                # Network and IPC namespaces of its own: no host service, no abstract socket.
                for ns in ("net", "ipc"):
                    assert os.readlink(f"/proc/{vm.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
                ids[name] = (uid, gid)
            assert ids["a"] != ids["b"]  # a uid per VM

            # As VM a's QEMU user: b's disk by path and through b's QEMU's descriptor,
            # b's QEMU's memory (which a shared uid would open, as a's own shows) and b's QMP
            # socket are all refused.
            b_fd = fd_of(b.pid, disks["b"])
            paths = [str(disks["b"]), f"/proc/{b.pid}/fd/{b_fd}", f"/proc/{b.pid}/mem", f"/proc/{a.pid}/mem"]
            out = try_as(*ids["a"], OPEN.replace("sys.argv[1:]", repr(paths)))
            assert out.splitlines() == [
                f"refused 13 {disks['b']}",
                f"refused 13 /proc/{b.pid}/fd/{b_fd}",
                f"refused 13 /proc/{b.pid}/mem",
                f"opened /proc/{a.pid}/mem",
            ], out
            connect = (
                "import socket\n"
                "try:\n"
                f"    socket.socket(socket.AF_UNIX).connect({str(b.qmp_socket)!r}); print('connected')\n"
                "except OSError as e:\n"
                "    print('refused', e.errno)\n"
            )
            assert try_as(*ids["a"], connect) == "refused 13"
        finally:
            for vm in vms.values():
                await vm.kill()

    run(scenario)
