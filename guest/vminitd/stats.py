"""A container's cgroup v2 files, read into io.containerd.cgroups.v2.Metrics."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinbox.ttrpc import Code, TtrpcError

METRICS_MODULE = "spinbox.api.proto.containerd.cgroups.v2.metrics_pb2"


def flat_keyed(text: str) -> dict[str, int]:
    """`key value` lines (memory.stat, cpu.stat, memory.events, pids.events)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def single(text: str) -> int | None:
    """A one-value file; None for "max" (no limit)."""
    text = text.strip()
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class IoEntry:
    major: int
    minor: int
    values: dict[str, int]


def io_stat(text: str) -> list[IoEntry]:
    """io.stat lines: `MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N`."""
    entries = []
    for line in text.splitlines():
        device, *pairs = line.split()
        major, _, minor = device.partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        values = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if value.isdigit():
                values[key] = int(value)
        entries.append(IoEntry(int(major), int(minor), values))
    return entries


@dataclass(frozen=True)
class CgroupStats:
    pids_current: int | None = None
    pids_max: int | None = None
    cpu: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    memory_current: int | None = None
    memory_peak: int | None = None
    memory_max: int | None = None
    swap_current: int | None = None
    swap_max: int | None = None
    memory_events: dict[str, int] = field(default_factory=dict)
    io: list[IoEntry] = field(default_factory=list)


def read(cgroup: Path) -> CgroupStats:
    """Whatever of the cgroup's stat files exist (a controller may be off)."""

    def text(name: str) -> str | None:
        try:
            return (cgroup / name).read_text()
        except OSError:
            return None

    def one(name: str) -> int | None:
        value = text(name)
        return None if value is None else single(value)

    def keyed(name: str) -> dict[str, int]:
        value = text(name)
        return {} if value is None else flat_keyed(value)

    io = text("io.stat")
    return CgroupStats(
        pids_current=one("pids.current"),
        pids_max=one("pids.max"),
        cpu=keyed("cpu.stat"),
        memory=keyed("memory.stat"),
        memory_current=one("memory.current"),
        memory_peak=one("memory.peak"),
        memory_max=one("memory.max"),
        swap_current=one("memory.swap.current"),
        swap_max=one("memory.swap.max"),
        memory_events=keyed("memory.events"),
        io=[] if io is None else io_stat(io),
    )


def _fill(message: Any, values: dict[str, int]) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        if key in fields:
            setattr(message, key, value)


def to_metrics(s: CgroupStats) -> bytes:
    """Serialized io.containerd.cgroups.v2.Metrics."""
    try:
        metrics_pb2: Any = importlib.import_module(METRICS_MODULE)
    except ImportError:
        raise TtrpcError(Code.UNIMPLEMENTED, "this guest has no cgroups v2 metrics message") from None
    m = metrics_pb2.Metrics()
    if s.pids_current is not None:
        m.pids.current = s.pids_current
        m.pids.limit = s.pids_max or 0
    _fill(m.cpu, s.cpu)
    _fill(m.memory, s.memory)
    m.memory.usage = s.memory_current or 0
    m.memory.max_usage = s.memory_peak or 0
    m.memory.usage_limit = s.memory_max if s.memory_max is not None else 0xFFFFFFFFFFFFFFFF
    m.memory.swap_usage = s.swap_current or 0
    m.memory.swap_limit = s.swap_max if s.swap_max is not None else 0xFFFFFFFFFFFFFFFF
    _fill(m.memory_events, s.memory_events)
    for entry in s.io:
        usage = m.io.usage.add()
        usage.major, usage.minor = entry.major, entry.minor
        _fill(usage, entry.values)
    result: bytes = m.SerializeToString()
    return result


def metrics(cgroup: Path) -> bytes:
    return to_metrics(read(cgroup))
