"""One state file per VM: the machine's and the daemon's records share vm.json,
and the previous release's two files (a flat vm.json and state.json) still load."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from spinbox import statefile
from spinbox.daemon.state import VmState as DaemonState
from spinbox.vm.errors import VmNotRunning
from spinbox.vm.machine import VmState as MachineState

MACHINE = MachineState(
    vm_id="default-u1",
    pid=4242,
    start_time=99,
    accel="tcg",
    agent_address="unix:/run/spinbox/vm/default-u1/agent.sock",
    control_address="unix:/run/spinbox/vm/default-u1/control.sock",
    hotplug_ports=2,
    stamps={"exec": 1.0},
)
DAEMON = DaemonState(
    id="default-u1",
    phase="running",
    scope="spinbox-vm-default-u1.scope",
    pid=4242,
    container_id="u1",
    addresses=["10.77.0.5/16"],
)


def test_both_records_live_in_one_file(tmp_path: Path) -> None:
    DAEMON.save(tmp_path)
    MACHINE.save(tmp_path / "vm.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.json"]
    data = json.loads((tmp_path / "vm.json").read_text())
    assert set(data) == {"machine", "daemon"}
    assert MachineState.load(tmp_path / "vm.json") == MACHINE
    assert DaemonState.load(tmp_path) == DAEMON
    # Each owner rewrites only its own section.
    DAEMON.phase = "paused"
    DAEMON.save(tmp_path)
    assert MachineState.load(tmp_path / "vm.json") == MACHINE
    assert DaemonState.load(tmp_path).phase == "paused"
    DAEMON.phase = "running"


def test_the_machine_section_goes_when_qemu_is_gone(tmp_path: Path) -> None:
    DAEMON.save(tmp_path)
    MACHINE.save(tmp_path / "vm.json")
    statefile.remove_section(tmp_path / "vm.json", statefile.MACHINE)
    with pytest.raises(VmNotRunning, match="names no QEMU"):
        MachineState.load(tmp_path / "vm.json")
    assert DaemonState.load(tmp_path) == DAEMON
    statefile.remove_section(tmp_path / "vm.json", statefile.DAEMON)
    assert list(tmp_path.iterdir()) == []


def write_previous_release(directory: Path) -> None:
    """The files the previous release wrote for a running VM."""
    (directory / "vm.json").write_text(json.dumps(asdict(MACHINE), sort_keys=True))
    (directory / "state.json").write_text(json.dumps(asdict(DAEMON), indent=1, sort_keys=True))


def test_the_previous_release_files_are_adopted_then_merged(tmp_path: Path) -> None:
    write_previous_release(tmp_path)
    assert MachineState.load(tmp_path / "vm.json") == MACHINE
    assert DaemonState.load(tmp_path) == DAEMON
    # The next save of either record writes the one file and drops state.json.
    DAEMON.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.json"]
    assert MachineState.load(tmp_path / "vm.json") == MACHINE
    assert DaemonState.load(tmp_path) == DAEMON
    write_previous_release(tmp_path)
    MACHINE.save(tmp_path / "vm.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.json"]
    assert DaemonState.load(tmp_path) == DAEMON


def test_a_vm_created_before_qemu_started_has_only_the_daemon_record(tmp_path: Path) -> None:
    DAEMON.save(tmp_path)
    with pytest.raises(VmNotRunning):
        MachineState.load(tmp_path / "vm.json")


def test_unreadable_state_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        DaemonState.load(tmp_path)
    (tmp_path / "vm.json").write_text('{"machine": 3}')
    with pytest.raises(ValueError, match="section 'machine'"):
        DaemonState.load(tmp_path)
    (tmp_path / "vm.json").write_text('{"machine": {}}')
    with pytest.raises(ValueError, match="no daemon section"):
        DaemonState.load(tmp_path)
