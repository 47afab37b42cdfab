"""The interfaces in code are exactly the documented XML under dbus/."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from dbus_fast import introspection as intr
from dbus_fast.service import ServiceInterface

from spinbox.daemon.service import MANAGER_IFACE, VM_IFACE, ManagerInterface, VMInterface

TOP = Path(__file__).resolve().parents[3]


def _documented(name: str) -> intr.Interface:
    root = ET.parse(TOP / "dbus" / f"{name}.xml").getroot()
    (element,) = [e for e in root.iter("interface") if e.get("name") == name]
    return intr.Interface.from_xml(element)


def _shape(interface: intr.Interface) -> dict[str, object]:
    return {
        "methods": sorted(
            (m.name, tuple(a.signature for a in m.in_args), tuple(a.signature for a in m.out_args))
            for m in interface.methods
        ),
        "signals": sorted((s.name, tuple(a.signature for a in s.args)) for s in interface.signals),
        "properties": sorted((p.name, p.signature, p.access.value) for p in interface.properties),
    }


def _implemented(cls: type[ServiceInterface]) -> intr.Interface:
    instance = cls.__new__(cls)
    ServiceInterface.__init__(instance, MANAGER_IFACE if cls is ManagerInterface else VM_IFACE)
    return ServiceInterface.introspect(instance)


def test_manager_matches_its_xml() -> None:
    assert _shape(_implemented(ManagerInterface)) == _shape(_documented(MANAGER_IFACE))


def test_vm_matches_its_xml() -> None:
    assert _shape(_implemented(VMInterface)) == _shape(_documented(VM_IFACE))
