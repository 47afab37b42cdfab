"""spinbox.service in a real systemd: readiness, the documented API, authorization, bad input."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import (
    BUS,
    MANAGER_IFACE,
    MANAGER_PATH,
    PYTHON,
    TOP,
    busctl,
    call_json,
    get_property,
    installed,
    leftovers,
)

NOBODY = 65534
POLKIT_GRANTS_NOBODY = """polkit.addRule(function(action, subject) {
    if (action.id == "org.spinstack.spinbox.manage" && subject.user == "nobody") {
        return polkit.Result.YES;
    }
});
"""
NOBODY_MAY_CALL = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="nobody"><allow send_destination="org.spinstack.Spinbox"/></policy>
</busconfig>
"""


@pytest.fixture(scope="module")
def spinbox(systemd: PrivateSystemd) -> Iterator[PrivateSystemd]:
    with installed(systemd):
        systemd.systemctl("start", "spinbox.service")
        yield systemd


def _shape(root: ET.Element, name: str) -> dict[str, object]:
    (iface,) = [e for e in root.iter("interface") if e.get("name") == name]
    return {
        "methods": sorted(
            (m.get("name"), tuple((a.get("direction") or "in", a.get("type")) for a in m.iter("arg")))
            for m in iface.iter("method")
        ),
        "signals": sorted(
            (s.get("name"), tuple(a.get("type") for a in s.iter("arg"))) for s in iface.iter("signal")
        ),
        "properties": sorted((p.get("name"), p.get("type"), p.get("access")) for p in iface.iter("property")),
    }


def test_unit_is_active_only_once_it_serves(spinbox: PrivateSystemd) -> None:
    # Type=notify: `systemctl start` returned, so READY=1 came; by then the name is owned.
    assert spinbox.unit_property("spinbox.service", "ActiveState") == "active"
    assert spinbox.unit_property("spinbox.service", "Type") == "notify"
    owner = busctl(spinbox, "status", BUS).stdout
    assert "spinbox.service" in owner
    assert spinbox.unit_property("spinbox.service", "StatusText") == "0 VMs running"
    assert spinbox.unit_property("spinbox.service", "WatchdogUSec") == "30s"
    journal = spinbox.journal("-u", "spinbox.service", "-o", "cat")
    assert journal.rindex("serving org.spinstack.Spinbox") < journal.rindex("Started spinbox.service")
    # Without cgroup2's memory controller each start says once that MemoryMax is not enforced.
    serving = journal.rindex("serving org.spinstack.Spinbox")
    this_start = journal[journal.rfind("serving org.spinstack.Spinbox", 0, serving) + 1 : serving]
    offered = spinbox.path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    said = "cgroup2 offers no memory controller here (cgroup.controllers of /sys/fs/cgroup: "
    assert this_start.count(said) == (0 if "memory" in offered else 1), this_start


def test_introspection_is_the_documented_xml(spinbox: PrivateSystemd) -> None:
    served = ET.fromstring(busctl(spinbox, "introspect", "--xml-interface", BUS, MANAGER_PATH).stdout)
    documented = ET.parse(TOP / "dbus" / f"{MANAGER_IFACE}.xml").getroot()
    assert _shape(served, MANAGER_IFACE) == _shape(documented, MANAGER_IFACE)
    table = busctl(spinbox, "introspect", BUS, MANAGER_PATH).stdout
    for member in (
        "CreateVM",
        "GetVM",
        "ListVMs",
        "PrepareNetworkNamespace",
        "VMEnding",
        "VMEndingCause",
        "VMAdded",
        "VMRemoved",
        "Defaults",
    ):
        assert f".{member} " in table


def test_properties_are_readable_by_anyone(spinbox: PrivateSystemd) -> None:
    result = busctl(spinbox, "get-property", BUS, MANAGER_PATH, MANAGER_IFACE, "Accelerator", user=NOBODY)
    assert result.stdout.strip() in ('s "tcg"', 's "kvm"')
    assert call_json(spinbox, MANAGER_PATH, MANAGER_IFACE, "ListVMs") == [[]]
    assert get_property(spinbox, MANAGER_PATH, MANAGER_IFACE, "Version")


def test_non_root_may_not_create(spinbox: PrivateSystemd) -> None:
    result = busctl(
        spinbox,
        "call",
        BUS,
        MANAGER_PATH,
        MANAGER_IFACE,
        "CreateVM",
        "sa{sv}",
        "denied",
        "0",
        user=NOBODY,
        check=False,
    )
    assert result.returncode != 0
    assert "Access denied" in result.stderr
    assert leftovers(spinbox) == {"scopes": [], "qemu": [], "files": [], "netns": []}


def test_polkit_decides_for_callers_the_bus_policy_lets_through(spinbox: PrivateSystemd) -> None:
    # Let nobody past the bus policy, so the call reaches spinboxd's own check:
    # root, else polkit's org.spinstack.spinbox.manage.
    policy = "/etc/dbus-1/system.d/spinbox-test-nobody.conf"
    rule = "/etc/polkit-1/rules.d/50-spinbox-test.rules"
    spinbox.write_file(policy, NOBODY_MAY_CALL)
    reload = ("call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "ReloadConfig")
    busctl(spinbox, *reload)
    script = (
        "import asyncio, sys\n"
        "from dbus_fast import BusType, Message, Variant\n"
        "from dbus_fast.aio.message_bus import MessageBus\n"
        "async def main():\n"
        "    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()\n"
        "    reply = await bus.call(Message(destination='org.spinstack.Spinbox',\n"
        "        path='/org/spinstack/Spinbox', interface='org.spinstack.Spinbox.Manager',\n"
        "        member='CreateVM', signature='sa{sv}',\n"
        "        body=['nobodys', {'colour': Variant('s', 'blue')}]))\n"
        "    print(reply.error_name, reply.body)\n"
        "asyncio.run(main())\n"
    )

    def create_as_nobody() -> str:
        argv = (
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            str(PYTHON),
            "-c",
            script,
        )
        return spinbox.run(*argv).stdout

    try:
        denied = create_as_nobody()
        assert denied.startswith("org.freedesktop.DBus.Error.AccessDenied")
        assert "uid 65534 is not authorized for org.spinstack.spinbox.manage" in denied
        # A polkit rule that grants the action: now the request itself is judged.
        spinbox.write_file(rule, POLKIT_GRANTS_NOBODY)
        spinbox.wait_for(
            "polkit to grant the action",
            lambda: create_as_nobody().startswith("org.spinstack.Spinbox.Error.InvalidArgument"),
        )
    finally:
        spinbox.path(policy).unlink()
        with contextlib.suppress(FileNotFoundError):
            spinbox.path(rule).unlink()
        busctl(spinbox, *reload)
    assert leftovers(spinbox) == {"scopes": [], "qemu": [], "files": [], "netns": []}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["sa{sv}", "bad", "1", "vcpus", "s", "two"], "option 'vcpus'"),
        (["sa{sv}", "bad", "1", "memory-mib", "t", "1"], "option 'memory-mib'"),
        (["sa{sv}", "bad", "1", "netns", "s", "/nonexistent"], "option 'netns'"),
        (["sa{sv}", "bad", "1", "colour", "s", "blue"], "option 'colour'"),
        (["sa{sv}", "../bad", "0"], "VM id"),
    ],
)
def test_malformed_options_get_invalid_argument(spinbox: PrivateSystemd, args: list[str], named: str) -> None:
    result = busctl(spinbox, "call", BUS, MANAGER_PATH, MANAGER_IFACE, "CreateVM", *args, check=False)
    assert result.returncode != 0
    assert named in result.stderr
    assert leftovers(spinbox) == {"scopes": [], "qemu": [], "files": [], "netns": []}


def test_unknown_vm_is_not_found(spinbox: PrivateSystemd) -> None:
    result = busctl(spinbox, "call", BUS, MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", "ghost", check=False)
    assert "there is no VM 'ghost'" in result.stderr
    ending = busctl(
        spinbox, "call", BUS, MANAGER_PATH, MANAGER_IFACE, "VMEndingCause", "su", "ghost", "0", check=False
    )
    assert "there is no VM 'ghost', nor one that ended lately" in ending.stderr


def test_text_beyond_ascii_is_answered_and_spinboxd_stays_on_the_bus(spinbox: PrivateSystemd) -> None:
    # An error naming what the caller sent, with characters UTF-8 spells in several bytes: the
    # reply must be a valid message, or the bus would disconnect spinboxd (for every caller).
    owner = busctl(spinbox, "status", BUS).stdout
    for name in ("vm-é", "容器", "emoji-🙂"):
        result = busctl(
            spinbox, "call", BUS, MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", name, check=False, user=NOBODY
        )
        assert f"VM id {name!r} is not valid" in result.stderr, result
    assert busctl(spinbox, "status", BUS).stdout == owner
    assert get_property(spinbox, MANAGER_PATH, MANAGER_IFACE, "Accelerator")


def test_a_call_starts_the_service_by_bus_activation(spinbox: PrivateSystemd) -> None:
    spinbox.systemctl("stop", "spinbox.service")
    assert get_property(spinbox, MANAGER_PATH, MANAGER_IFACE, "Version")
    assert spinbox.unit_property("spinbox.service", "ActiveState") == "active"


def test_spinboxctl_check_reports_the_host(spinbox: PrivateSystemd) -> None:
    result = spinbox.run("env", f"PYTHONPATH={TOP}", str(PYTHON), "-m", "spinbox.cli", "check", check=False)
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
    assert rows["spinboxd"] == "ok"
    assert rows["qemu"] == "ok"
    assert rows["accelerator"] == "ok"
    # One row per CNI plugin spinbox's own network list needs.
    assert {name for name in rows if name.startswith("cni/")} == {
        "cni/bridge", "cni/host-local", "cni/firewall",
    }  # fmt: skip
    assert all(rows[name] == "ok" for name in rows if name.startswith("cni/"))
