"""Parsing what QEMU and /proc say about a VM's vCPUs, and what the guest's console is sent."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from spinbox.vm import gueststate
from spinbox.vm.gueststate import (
    BREAK,
    VcpuRegisters,
    console_loglevel,
    describe_vcpus,
    kernel_args_of,
    parse_registers,
    sysrq_sequence,
    thread_cpu_seconds,
)

# QEMU 7.2's `info registers -a` (TCG, Debian's cloud kernel): vCPU 0 spinning in user mode
# with interrupts on, vCPU 1 halted in the kernel's idle loop (FPU and vector registers cut).
INFO_REGISTERS = """
CPU#0
RAX=000000000001ad40 RBX=0000000000000000 RCX=0000000000000001 RDX=4000000000000000
RSI=0000000000000083 RDI=00000000000334fc RBP=ffffffffb5e1aa40 RSP=00007ffcf679e9f8
R8 =0000000000000000 R9 =000000003457cdb0 R10=0000000000000000 R11=0000000000000001
R12=0000000000000000 R13=0000000000000000 R14=0000000000000000 R15=0000000000014790
RIP=0000000000401a2b RFL=00000246 [---Z-P-] CPL=3 II=0 A20=1 SMM=0 HLT=0
ES =0000 0000000000000000 00000000 00000000
CS =0033 0000000000000000 ffffffff 00a0fb00 DPL=3 CS64 [-RA]
CR0=80050033 CR2=0000000000531343 CR3=000000000b210000 CR4=00750eb0
EFER=0000000000000d01
YMM00=0000000000000000 0000000000000000 00000000005e2163 00000000005e2163

CPU#1
RAX=000000000001ad40 RBX=0000000000000000 RCX=0000000000000001 RDX=4000000000000000
RSI=0000000000000083 RDI=000000000004a3b4 RBP=ffff8bd7c1274180 RSP=ffffcde00009bed8
RIP=ffffffffb4e17a0b RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CR0=80050033 CR2=00007ffcf679ea00 CR3=000000000289e000 CR4=00750ea0
"""


def test_info_registers_are_read_vcpu_by_vcpu() -> None:
    first, second = parse_registers(INFO_REGISTERS)
    assert first == VcpuRegisters(
        index=0, rip=0x401A2B, rsp=0x7FFCF679E9F8, rflags=0x246, cpl=3, halted=False, cr3=0xB210000
    )
    assert first.describe() == (
        "running in user mode at RIP 0x0000000000401a2b, RSP 0x00007ffcf679e9f8, CR3 0xb210000, interrupts on"
    )
    assert (second.index, second.rip, second.cpl, second.halted) == (1, 0xFFFFFFFFB4E17A0B, 0, True)
    assert second.describe().startswith("halted in kernel mode at RIP 0xffffffffb4e17a0b")
    assert second.describe().endswith("interrupts off")  # RFL 0x46: IF clear


def test_what_is_not_a_whole_vcpu_is_left_out() -> None:
    assert parse_registers("") == []
    assert parse_registers("RIP=ffffffff81000000 CPL=0 HLT=0\n") == []  # no CPU# header
    cut = INFO_REGISTERS.split("CR0=80050033 CR2=00007ffcf679ea00")[0]  # CPU#1 has no CR3
    assert [r.index for r in parse_registers(cut)] == [0]
    # The guest's values are hex digits or nothing: a register that is not is not read.
    assert parse_registers("CPU#0\nRIP=zz RSP=1 RFL=2 CPL=0 HLT=0 CR3=3\n") == []


def test_a_threads_cpu_time_comes_from_proc(tmp_path: Path) -> None:
    task = tmp_path / "7" / "task" / "9"
    task.mkdir(parents=True)
    tick = os.sysconf("SC_CLK_TCK")
    # Field 14 and 15 (utime, stime) count from the end of the command name, which may hold ") ".
    fields = ["R", *["0"] * 10, str(3 * tick), str(tick), *["0"] * 30]
    (task / "stat").write_text(f"9 (CPU 0/TCG) x) {' '.join(fields)}\n")
    assert thread_cpu_seconds(7, 9, tmp_path) == 4.0
    assert thread_cpu_seconds(7, 10, tmp_path) is None


def test_the_console_loglevel_follows_the_kernel_command_line(tmp_path: Path) -> None:
    assert console_loglevel(["console=ttyS0", "quiet", "panic=-1"]) == 4
    assert console_loglevel(["quiet", "loglevel=6"]) == 6
    assert console_loglevel(["loglevel=x"]) == 7
    (tmp_path / "5").mkdir()
    argv = ["qemu-system-x86_64", "-kernel", "k", "-append", "console=ttyS0 quiet loglevel=6", "-S"]
    (tmp_path / "5" / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    assert kernel_args_of(5, tmp_path) == ["console=ttyS0", "quiet", "loglevel=6"]
    assert kernel_args_of(6, tmp_path) == []


def test_sysrq_raises_the_loglevel_for_the_dumps_and_puts_it_back() -> None:
    assert sysrq_sequence(4) == [BREAK + b"9", BREAK + b"l", BREAK + b"w", BREAK + b"4"]
    assert sysrq_sequence(10)[-1] == BREAK + b"9"
    assert BREAK == b"\x01b"  # QEMU's mux escape: Ctrl-a b


class FakeQemu:
    pid = 4242

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def query(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.commands.append(command)
        if command == "query-cpus-fast":
            return [{"cpu-index": 0, "thread-id": 11}, {"cpu-index": 1, "thread-id": 12}]
        if command == "query-status":
            return {"status": "running", "running": True}
        assert arguments == {"command-line": "info registers -a"}
        return INFO_REGISTERS


def test_each_vcpu_gets_a_line_with_its_threads_cpu_use(monkeypatch: Any) -> None:
    samples = iter([10.0, 5.0, 10.01, 5.0])  # vCPU 0 spins through the second, vCPU 1 sleeps
    monkeypatch.setattr(gueststate, "thread_cpu_seconds", lambda pid, tid: next(samples))
    qemu = FakeQemu()
    lines = asyncio.run(describe_vcpus(qemu, sample=0.01))
    assert lines[0] == "QEMU's vCPUs are running: 2 vCPUs"
    assert lines[1].startswith("vCPU 0: thread 11 used 100% of a host CPU; running in user mode")
    assert lines[2].startswith("vCPU 1: thread 12 used 0% of a host CPU; halted in kernel mode")
    assert lines[2].endswith("0.01 s later halted at RIP 0xffffffffb4e17a0b")
    assert qemu.commands.count("human-monitor-command") == 2
