"""What this host offers spinbox's VMs: a usable KVM and Debian's cloud
kernel. Read by the configuration, spinboxctl's checks and the VM launcher."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

KERNEL_PACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True)
class KvmHost:
    """The host facts the choice of accelerator depends on (paths are parameters for tests)."""

    dev_kvm: Path = Path("/dev/kvm")
    pvm_module: Path = Path("/sys/module/kvm_pvm")

    def usable(self) -> tuple[bool, str]:
        """Whether KVM can run spinbox's guests, and if not, why not."""
        if not self.dev_kvm.exists():
            return False, f"{self.dev_kvm} does not exist"
        if self.pvm_module.exists():
            # PVM runs only PVM-enabled guest kernels; an ordinary kernel hangs at boot.
            return False, "the host's KVM is PVM (kvm_pvm), which cannot run ordinary guest kernels"
        if not os.access(self.dev_kvm, os.R_OK | os.W_OK):
            return False, f"{self.dev_kvm} is not readable and writable"
        return True, ""


def newest_cloud_kernel(boot: Path = Path("/boot")) -> Path | None:
    """The newest installed Debian cloud kernel (vmlinuz-*-cloud-amd64), or None."""
    candidates = sorted(boot.glob("vmlinuz-*-cloud-amd64"), key=lambda p: _version_key(p.name))
    return candidates[-1] if candidates else None


def _version_key(name: str) -> list[tuple[int, str]]:
    """Sort key that orders 6.1.0-10 after 6.1.0-9."""
    return [(int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"[.\-+~]", name)]


# The separate virtiofsd package (newer distributions) first, then QEMU's own (Debian 12).
VIRTIOFSD_PATHS = (Path("/usr/libexec/virtiofsd"), Path("/usr/lib/qemu/virtiofsd"))


def find_virtiofsd() -> Path | None:
    """virtiofsd, which serves a VM's share of host directories and files for bind mounts."""
    for path in VIRTIOFSD_PATHS:
        if os.access(path, os.X_OK):
            return path
    return None


def memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The host's memory (MemTotal) in MiB: no VM is given more."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ValueError(f"{meminfo} has no MemTotal line")
