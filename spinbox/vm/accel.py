"""Which accelerator QEMU uses: KVM where it can run an ordinary guest, else TCG."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from spinbox.vm.errors import VmError
from spinbox.vm.spec import Accel

log = logging.getLogger(__name__)

_warned = False


@dataclass(frozen=True)
class KvmHost:
    """The host facts the choice depends on (paths are parameters for tests)."""

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


def choose_accel(wanted: Accel, host: KvmHost | None = None) -> str:
    """Resolve "auto" to "kvm" or "tcg"; "kvm" on a host without usable KVM is an error."""
    host = host or KvmHost()
    if wanted == "tcg":
        return "tcg"
    ok, why = host.usable()
    if ok:
        return "kvm"
    if wanted == "kvm":
        raise VmError(f"KVM was asked for but is not usable: {why}")
    _warn_tcg(why)
    return "tcg"


def _warn_tcg(why: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("KVM is not usable (%s); VMs run under TCG emulation, which is much slower", why)
