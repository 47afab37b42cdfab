"""spinboxd's names on the system bus (org.spinstack.Spinbox), shared by
spinboxd, the shim and spinboxctl. The interfaces are documented in dbus/."""

from __future__ import annotations

BUS_NAME = "org.spinstack.Spinbox"
MANAGER_PATH = "/org/spinstack/Spinbox"
MANAGER_IFACE = "org.spinstack.Spinbox.Manager"
VM_IFACE = "org.spinstack.Spinbox.VM"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
ERROR_PREFIX = "org.spinstack.Spinbox.Error."
