"""vminitd's view of plugged memory: MemTotal beyond boot, and the blocks the kernel is still removing."""

from __future__ import annotations

import asyncio
import errno
import struct
from pathlib import Path
from typing import Any

import pytest

from guest.vminitd import hotplug
from guest.vminitd.hotplug import KPF_OFFLINE, BootMemory, MemoryView

PAGES = 4  # pages per memory block in the fake tree (block_size_bytes 0x4000)


def fake_tree(tmp_path: Path, blocks: dict[int, str], mem_total_kib: int) -> tuple[Path, Path, Path]:
    memory = tmp_path / "memory"
    memory.mkdir(exist_ok=True)
    (memory / "block_size_bytes").write_text(f"{PAGES * 4096:x}\n")
    for old in memory.glob("memory*"):
        (old / "state").unlink()
        old.rmdir()
    for index, state in blocks.items():
        (memory / f"memory{index}").mkdir()
        (memory / f"memory{index}" / "state").write_text(state + "\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {mem_total_kib} kB\nMemFree:        1000 kB\n")
    return memory, meminfo, tmp_path / "kpageflags"


def write_flags(path: Path, flags_by_pfn: list[int]) -> None:
    path.write_bytes(struct.pack(f"<{len(flags_by_pfn)}Q", *flags_by_pfn))


def test_boot_memory_is_memtotal_and_the_blocks_present(tmp_path: Path) -> None:
    memory, meminfo, _ = fake_tree(tmp_path, {0: "online", 1: "online"}, 222236)
    assert BootMemory.read(memory, meminfo) == BootMemory(222236, frozenset({"memory0", "memory1"}))


def test_a_plugged_block_given_back_or_going_offline_is_still_being_removed(tmp_path: Path) -> None:
    memory, meminfo, kpageflags = fake_tree(tmp_path, {0: "online", 1: "online"}, 100)
    boot = BootMemory.read(memory, meminfo)
    # Blocks 2 and 3 plugged since boot: 2 holds plugged pages (only its top pages given back),
    # 3 has every page given back (PageOffline).
    flags = [0] * (2 * PAGES) + [0, 0, KPF_OFFLINE, KPF_OFFLINE] + [KPF_OFFLINE] * PAGES
    write_flags(kpageflags, flags)
    fake_tree(tmp_path, {0: "online", 1: "online", 2: "online", 3: "online"}, 100 + 24)
    view = hotplug.memory_view(boot, memory, meminfo, kpageflags)
    assert view == MemoryView(124, 1)
    assert not view.settled(boot, 24)

    fake_tree(tmp_path, {0: "online", 1: "online", 2: "online", 3: "going-offline"}, 100 + 24 + 16)
    assert hotplug.memory_view(boot, memory, meminfo, kpageflags) == MemoryView(140, 1)

    # Offline (added but not yet onlined, or offline and about to go): not counted as removing;
    # MemTotal alone says whether the memory is there.
    fake_tree(tmp_path, {0: "online", 1: "online", 2: "online", 3: "offline"}, 100 + 24)
    view = hotplug.memory_view(boot, memory, meminfo, kpageflags)
    assert view == MemoryView(124, 0)
    assert view.settled(boot, 24)
    assert not view.settled(boot, 16)


def test_a_block_whose_first_page_is_given_back_but_not_all_is_in_use(tmp_path: Path) -> None:
    memory, meminfo, kpageflags = fake_tree(tmp_path, {0: "online"}, 100)
    boot = BootMemory.read(memory, meminfo)
    write_flags(kpageflags, [0] * PAGES + [KPF_OFFLINE, 0, KPF_OFFLINE, KPF_OFFLINE] + [KPF_OFFLINE] * PAGES)
    fake_tree(tmp_path, {0: "online", 1: "online", 2: "online"}, 100 + 16)
    assert hotplug.memory_view(boot, memory, meminfo, kpageflags) == MemoryView(116, 1)


def test_boot_blocks_are_never_read_from_kpageflags(tmp_path: Path) -> None:
    memory, meminfo, kpageflags = fake_tree(tmp_path, {0: "online"}, 100)
    write_flags(kpageflags, [KPF_OFFLINE] * PAGES)  # a boot block's pages, whatever they are
    boot = BootMemory.read(memory, meminfo)
    assert hotplug.memory_view(boot, memory, meminfo, kpageflags) == MemoryView(100, 0)


def test_settle_memory_waits_until_memtotal_and_the_blocks_agree() -> None:
    boot = BootMemory(1000, frozenset())
    # A shrink of 128 MiB as the kernel does it: MemTotal drops, comes back while the emptied
    # block goes offline, and drops again once it is removed.
    seen = iter(
        [MemoryView(1000 + 128, 0), MemoryView(1000, 1), MemoryView(1000 + 128, 1), MemoryView(1000, 0)]
    )
    views: list[MemoryView] = []

    def view(_: BootMemory) -> MemoryView:
        views.append(next(seen))
        return views[-1]

    result = asyncio.run(hotplug.settle_memory(boot, 0, 30.0, view))
    assert result == MemoryView(1000, 0)
    assert len(views) == 4


def test_settle_memory_answers_what_it_has_at_its_deadline() -> None:
    boot = BootMemory(1000, frozenset())
    result = asyncio.run(hotplug.settle_memory(boot, 0, 0.1, lambda _: MemoryView(1128, 1)))
    assert result == MemoryView(1128, 1)


def test_a_block_removed_while_read_is_not_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory, meminfo, kpageflags = fake_tree(tmp_path, {0: "online"}, 100)
    boot = BootMemory.read(memory, meminfo)
    write_flags(kpageflags, [0] * PAGES + [KPF_OFFLINE] * PAGES)
    fake_tree(tmp_path, {0: "online", 1: "online"}, 100)
    real = Path.read_text

    def read_text(path: Path, *args: Any, **kwargs: Any) -> str:
        if path.name == "state" and path.parent.name == "memory1":
            raise OSError(errno.ENODEV, "No such device")  # sysfs of a block being removed
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert hotplug.memory_view(boot, memory, meminfo, kpageflags) == MemoryView(100, 0)


def test_a_kernel_without_memory_hotplug_has_only_its_boot_memory(tmp_path: Path) -> None:
    # The kernel built by kernel/ has no memory hotplug and so no /sys/devices/system/memory.
    _, meminfo, kpageflags = fake_tree(tmp_path, {}, 100)
    missing = tmp_path / "no-memory-directory"
    boot = BootMemory.read(missing, meminfo)
    assert boot == BootMemory(100, frozenset())
    view = hotplug.memory_view(boot, missing, meminfo, kpageflags)
    assert view == MemoryView(100, 0)
    assert view.settled(boot, 0)
