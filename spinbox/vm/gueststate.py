"""Where a guest that stopped answering is: its vCPUs as QEMU sees them, and how to ask its kernel.

QEMU's view needs nothing of the guest: QMP's query-cpus-fast gives each vCPU's host thread,
whose CPU time (sampled twice) says whether it spins or sleeps, and HMP's `info registers -a`
gives each vCPU's instruction pointer, privilege level, halted flag, stack pointer and page
table root. The guest kernel's own view comes over its serial console: a BREAK followed by a
key is magic SysRq there (CONFIG_MAGIC_SYSRQ_SERIAL); QEMU's console chardev is a mux whose
escape Ctrl-a b sends the BREAK. `l` makes the kernel print every CPU's backtrace (by NMI, so
a CPU spinning with interrupts off answers too), `w` its blocked tasks; vminitd allows both
(kernel.sysrq) and the console loglevel is raised around them so that a quiet kernel prints
them. Everything read here is the guest's: it is parsed strictly and only ever logged.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# The console chardev's mux escape (Ctrl-a b): QEMU sends the guest's serial port a BREAK.
BREAK = b"\x01b"
# SysRq keys sent after the loglevel is raised: every CPU's backtrace, then blocked tasks.
SYSRQ_KEYS = (b"l", b"w")
# The guest's serial port reads a BREAK and its key before the next BREAK may come.
SYSRQ_PAUSE = 0.5
# How long the vCPU threads' CPU time is sampled over.
SAMPLE = 1.0
QUIET_LOGLEVEL = 4  # the kernel's `quiet`
DEFAULT_LOGLEVEL = 7

_CPU_HEADER = re.compile(r"^CPU#(\d+)\s*$")
_REGISTER = re.compile(r"\b(RIP|RSP|RFL|CPL|II|SMM|HLT|CR3)=([0-9a-fA-F]+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class Qmp(Protocol):
    """What a record needs of a VM (spinbox.vm.VirtualMachine)."""

    @property
    def pid(self) -> int: ...

    async def query(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...


@dataclass(frozen=True)
class VcpuRegisters:
    """One vCPU's state as `info registers` prints it."""

    index: int
    rip: int
    rsp: int
    rflags: int
    cpl: int
    halted: bool
    cr3: int
    interrupts_inhibited: bool = False
    smm: bool = False

    def describe(self) -> str:
        mode = "kernel" if self.cpl == 0 else "user" if self.cpl == 3 else f"ring {self.cpl}"
        interrupts = "on" if self.rflags & 0x200 else "off"
        state = "halted" if self.halted else "running"
        return (
            f"{state} in {mode} mode at RIP {self.rip:#018x}, RSP {self.rsp:#018x}, CR3 {self.cr3:#x}, "
            f"interrupts {interrupts}" + (", in SMM" if self.smm else "")
        )


def parse_registers(text: str) -> list[VcpuRegisters]:
    """`info registers -a`'s output, vCPU by vCPU (one without all its fields is left out)."""
    blocks: dict[int, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in text.splitlines():
        header = _CPU_HEADER.match(line.strip())
        if header:
            current = blocks.setdefault(int(header.group(1)), {})
            continue
        if current is None:
            continue
        for name, value in _REGISTER.findall(line):
            current.setdefault(name, int(value, 16 if name not in ("CPL", "II", "SMM", "HLT") else 10))
    out = []
    for index, fields in sorted(blocks.items()):
        if not {"RIP", "RSP", "RFL", "CPL", "HLT", "CR3"} <= fields.keys():
            continue
        out.append(
            VcpuRegisters(
                index=index,
                rip=fields["RIP"],
                rsp=fields["RSP"],
                rflags=fields["RFL"],
                cpl=fields["CPL"],
                halted=bool(fields["HLT"]),
                cr3=fields["CR3"],
                interrupts_inhibited=bool(fields.get("II", 0)),
                smm=bool(fields.get("SMM", 0)),
            )
        )
    return out


def thread_cpu_seconds(pid: int, tid: int, proc: Path = Path("/proc")) -> float | None:
    """A thread's user and system CPU time so far, or None once it is gone."""
    try:
        stat = (proc / str(pid) / "task" / str(tid) / "stat").read_text()
    except OSError:
        return None
    # The command name (in parentheses) may hold spaces: fields count from its closing one.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (IndexError, ValueError):
        return None


def console_loglevel(kernel_args: Sequence[str]) -> int:
    """The console loglevel a kernel command line gives (the last word that sets it wins)."""
    level = DEFAULT_LOGLEVEL
    for arg in kernel_args:
        if arg == "quiet":
            level = QUIET_LOGLEVEL
        elif arg == "debug":
            level = 10
        elif arg.startswith("loglevel=") and arg[9:].isdigit():
            level = int(arg[9:])
    return level


def kernel_args_of(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The guest kernel's command line, as QEMU (`pid`) was given it with -append."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
    for option, value in itertools.pairwise(argv):
        if option == b"-append":
            return value.decode(errors="replace").split()
    return []


def sysrq_sequence(loglevel: int) -> list[bytes]:
    """What to write to the console, one item at a time with SYSRQ_PAUSE between: the loglevel
    raised to 9 (the backtraces print at the default level), the dumps, the loglevel back."""
    back = str(max(0, min(loglevel, 9))).encode()
    return [BREAK + b"9", *(BREAK + key for key in SYSRQ_KEYS), BREAK + back]


async def describe_vcpus(vm: Qmp, sample: float = SAMPLE) -> list[str]:
    """One line per vCPU: its host thread, the share of a host CPU it used over `sample`
    seconds, and where it was (twice, `sample` apart: a spin shows the same few addresses)."""
    cpus = await vm.query("query-cpus-fast")
    threads = {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus if "thread-id" in c}
    before = {i: thread_cpu_seconds(vm.pid, tid) for i, tid in threads.items()}
    first = parse_registers(await _registers(vm))
    await asyncio.sleep(sample)
    after = {i: thread_cpu_seconds(vm.pid, tid) for i, tid in threads.items()}
    second = {r.index: r for r in parse_registers(await _registers(vm))}
    status = await vm.query("query-status")
    lines = [f"QEMU's vCPUs are {status.get('status', 'in an unknown state')}: {len(threads)} vCPUs"]
    for registers in first:
        tid = threads.get(registers.index)
        start, end = before.get(registers.index), after.get(registers.index)
        if tid is None or start is None or end is None:
            usage = "its thread is gone"
        else:
            usage = f"thread {tid} used {100 * (end - start) / sample:.0f}% of a host CPU"
        line = f"vCPU {registers.index}: {usage}; {registers.describe()}"
        later = second.get(registers.index)
        if later is not None:
            line += f"; {sample:g} s later {'halted' if later.halted else 'running'} at RIP {later.rip:#018x}"
        lines.append(line)
    return lines


async def _registers(vm: Qmp) -> str:
    reply = await vm.query("human-monitor-command", {"command-line": "info registers -a"})
    return reply if isinstance(reply, str) else ""
