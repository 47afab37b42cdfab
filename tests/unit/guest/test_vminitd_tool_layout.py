"""Under TCG vminitd runs crun with a fixed address layout (TCG then reuses the code it
translated for the last crun run), and containers' programs get a randomized one back."""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from guest.vminitd import boot, syscalls
from guest.vminitd.config import RuntimeConfig
from guest.vminitd.spec import prepare_spec


def personality_of(pid: str = "self") -> int:
    return int(Path(f"/proc/{pid}/personality").read_text(), 16)


def fixed_in_child(cmdline: dict[str, str], result: Any) -> None:
    fixed = boot.fix_tool_layout(cmdline)
    result.put((fixed, personality_of()))


def run_in_child(cmdline: dict[str, str]) -> tuple[bool, int]:
    """fix_tool_layout in a process of its own: the test's process keeps its personality."""
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(target=fixed_in_child, args=(cmdline, result))
    child.start()
    child.join(30)
    return result.get(timeout=1)  # type: ignore[no-any-return]


def test_the_fixed_layout_is_asked_for_on_the_kernel_command_line() -> None:
    fixed, personality = run_in_child({boot.TOOL_LAYOUT: "fixed"})
    assert fixed and personality & syscalls.ADDR_NO_RANDOMIZE
    fixed, personality = run_in_child({})
    assert not fixed and not personality & syscalls.ADDR_NO_RANDOMIZE


def test_another_value_is_ignored_and_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert not boot.fix_tool_layout({boot.TOOL_LAYOUT: "random"})
    assert 'ignoring spinbox.tool_layout=random: not "fixed"' in caplog.text
    assert not personality_of() & syscalls.ADDR_NO_RANDOMIZE


def prepare(tmp_path: Path, default_personality: bool, linux: dict[str, Any]) -> dict[str, Any]:
    config = RuntimeConfig(
        state_dir=tmp_path / "state", rootfs_dir=tmp_path / "rootfs", default_personality=default_personality
    )
    doc: dict[str, Any] = {"process": {"args": ["true"]}, "linux": linux}
    prepare_spec(config, "app", doc, tmp_path / "rootfs" / "app", terminal=False)
    return doc


def test_a_container_gets_linux_s_default_personality_back(tmp_path: Path) -> None:
    doc = prepare(tmp_path, True, {})
    assert doc["linux"]["personality"] == {"domain": "LINUX"}


def test_a_container_keeps_the_personality_its_spec_names(tmp_path: Path) -> None:
    doc = prepare(tmp_path, True, {"personality": {"domain": "LINUX32"}})
    assert doc["linux"]["personality"] == {"domain": "LINUX32"}


def test_without_a_fixed_layout_the_spec_names_no_personality(tmp_path: Path) -> None:
    assert "personality" not in prepare(tmp_path, False, {})["linux"]
