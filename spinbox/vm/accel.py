"""Which accelerator QEMU uses: KVM where it can run an ordinary guest, else TCG."""

from __future__ import annotations

import logging

from spinbox.host import KvmHost
from spinbox.vm.errors import VmError
from spinbox.vm.spec import Accel

log = logging.getLogger(__name__)

_warned = False


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
