"""What the host offers VMs: which accelerator works, where the kernel and guest image are."""

from __future__ import annotations

import os
from pathlib import Path

KVM_DEVICE = Path("/dev/kvm")
# A PVM host hypervisor only runs PVM-enabled guest kernels; ordinary ones hang.
PVM_MODULE = Path("/sys/module/kvm_pvm")


def kvm_status(device: Path = KVM_DEVICE, pvm_module: Path = PVM_MODULE) -> tuple[bool, str]:
    """(usable, reason) for KVM on this host."""
    if not device.exists():
        return False, f"{device} does not exist"
    if not os.access(device, os.R_OK | os.W_OK):
        return False, f"{device} is not readable and writable"
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"{device} cannot be opened: {e.strerror}"
    os.close(fd)
    if pvm_module.exists():
        return False, "the host hypervisor is PVM (kvm_pvm), which runs only PVM guest kernels"
    return True, f"{device} is usable"


def choose_accelerator(accel: str) -> tuple[str, str]:
    """The accelerator VMs will use for the configured `accel`, and why."""
    if accel == "tcg":
        return "tcg", 'configured: accel = "tcg"'
    usable, reason = kvm_status()
    if accel == "kvm":
        return "kvm", f'configured: accel = "kvm" ({reason})'
    if usable:
        return "kvm", reason
    return "tcg", f"KVM is not usable ({reason}); VMs run under TCG, much slower"
