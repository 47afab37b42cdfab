"""Watching for host mounts and loop devices of a VM's disks while spinbox runs."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.harness.systemd import PrivateSystemd


class HostMountWatch:
    """Polls spinboxd's mount table and the host's loop devices for anything of one VM's disks."""

    def __init__(self, systemd: PrivateSystemd, vm_id: str = "") -> None:
        """`vm_id` empty: any VM's disks."""
        self.systemd = systemd
        self.marker = f"/vms/{vm_id}/" if vm_id else "/var/lib/spinbox/vms/"
        pid = systemd.unit_property("spinbox.service", "MainPID")
        self.mountinfo = systemd.path(f"/proc/{pid}/mountinfo")
        self.baseline = set(self.mountinfo.read_text().splitlines())
        assert self.baseline, f"{self.mountinfo} is empty: the watch would see nothing"
        self.seen: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def seen_for(self, name: str) -> list[str]:
        """What was seen of disks whose paths name `name` (loop devices are the whole host's: other
        tests' VMs show up there too)."""
        return [line for line in self.seen if name in line]

    def __enter__(self) -> HostMountWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.polls += 1
            for line in set(self.mountinfo.read_text().splitlines()) - self.baseline:
                if self.marker in line or " ext4 " in line or "/dev/loop" in line:
                    self.seen.append(f"mount: {line}")
            for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
                try:
                    name = backing.read_text().strip()
                except OSError:
                    continue
                if self.marker in name:
                    self.seen.append(f"loop device on {name}")
