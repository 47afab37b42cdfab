"""QEMU microVMs: the command line, the process, QMP, and the guest agent's readiness."""

from __future__ import annotations

from spinbox.vm.accel import choose_accel
from spinbox.vm.errors import VmError, VmNotRunning
from spinbox.vm.machine import VirtualMachine, launch
from spinbox.vm.process import ProcessHandle, Spawn
from spinbox.vm.qemu import SLOT_MAC, QemuCommand
from spinbox.vm.spec import DEFAULT_IMAGE, Disk, MemoryFile, Nic, VmSpec, default_kernel

__all__ = [
    "DEFAULT_IMAGE",
    "SLOT_MAC",
    "Disk",
    "MemoryFile",
    "Nic",
    "ProcessHandle",
    "QemuCommand",
    "Spawn",
    "VirtualMachine",
    "VmError",
    "VmNotRunning",
    "VmSpec",
    "choose_accel",
    "default_kernel",
    "launch",
]
