"""The named D-Bus errors spinboxd answers with, each carrying a sentence."""

from __future__ import annotations

from dbus_fast import DBusError

from spinbox.busnames import ERROR_PREFIX


class SpinboxError(DBusError):
    """A failure a caller can act on; `name` is the D-Bus error name's last part."""

    name = "Failed"

    def __init__(self, text: str) -> None:
        super().__init__(self.error_name(), text)

    @classmethod
    def error_name(cls) -> str:
        return ERROR_PREFIX + cls.name


class NotFound(SpinboxError):
    name = "NotFound"


class InvalidArgument(SpinboxError):
    name = "InvalidArgument"


class AlreadyExists(SpinboxError):
    name = "AlreadyExists"


class Failed(SpinboxError):
    name = "Failed"


class GuestUnsettled(Failed):
    """A resize the machine made but whose guest did not count it in time; `size` is the
    machine's ("vcpus", "memory-mib"), which the VM's scope and record follow."""

    def __init__(self, text: str, size: dict[str, int]) -> None:
        super().__init__(text)
        self.size = size


class NoNetwork(SpinboxError):
    """The VM has no network (spinbox.toml's network.enabled is off): nothing to forward into."""

    name = "NoNetwork"


class AccessDenied(DBusError):
    """The caller may not change state; the standard bus error name, so clients know it."""

    def __init__(self, text: str) -> None:
        super().__init__("org.freedesktop.DBus.Error.AccessDenied", text)
