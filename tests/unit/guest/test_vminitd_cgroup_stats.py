"""Parsing of cgroup v2 stat files."""

from __future__ import annotations

from pathlib import Path

from guest.vminitd import stats


def test_flat_keyed() -> None:
    text = "anon 1234\nfile 5678\nbogus\nweird x\n"
    assert stats.flat_keyed(text) == {"anon": 1234, "file": 5678}


def test_single() -> None:
    assert stats.single("4096\n") == 4096
    assert stats.single("max\n") is None


def test_io_stat() -> None:
    entries = stats.io_stat("254:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n")
    assert entries == [
        stats.IoEntry(254, 0, {"rbytes": 4096, "wbytes": 0, "rios": 1, "wios": 0, "dbytes": 0, "dios": 0})
    ]


def test_read_tolerates_missing_controllers(tmp_path: Path) -> None:
    (tmp_path / "memory.current").write_text("8192\n")
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (tmp_path / "cpu.stat").write_text("usage_usec 100\nuser_usec 60\nsystem_usec 40\n")
    s = stats.read(tmp_path)
    assert s.memory_current == 8192
    assert s.memory_max is None
    assert s.memory_events["oom_kill"] == 1
    assert s.cpu["usage_usec"] == 100
    assert s.pids_current is None
    assert s.io == []
