"""Who may change state or read a VM's spec: root, and where polkit runs, whoever it authorizes.

dbus-fast's method handlers do not see the caller, so spinboxd installs a
message handler (record_caller) that notes each call's sender in a context
variable; every state-changing method first awaits authorize(), which checks
that sender (GetConnectionUnixUser, then polkit's CheckAuthorization) and
raises AccessDenied.

Properties that carry what a container's spec said (Resources holds every OCI
annotation, often secrets) have a polkit action of their own. dbus-fast
answers Properties.Get/GetAll and ObjectManager.GetManagedObjects itself,
with synchronous getters that cannot await polkit, so those reads are held
back by a second message handler (SpecGuard) until the caller is known: a Get
of a private property is denied, a GetAll answers without them. The
InterfacesAdded broadcast leaves them out (SpecHidingBus). These two reach
into dbus-fast internals (re-dispatching a held message, the exported
interfaces, the signal emitter): dbus-fast has no public hook for either.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio.message_bus import MessageBus
from dbus_fast.service import ServiceInterface

from spinbox.daemon import dbuscall
from spinbox.daemon.buswriter import BusWriter
from spinbox.daemon.errors import AccessDenied

log = logging.getLogger(__name__)

POLKIT_ACTION = "org.spinstack.spinbox.manage"
READ_SPEC_ACTION = "org.spinstack.spinbox.read-spec"
POLKIT = "org.freedesktop.PolicyKit1"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
# The bus and polkit answer at once (no interactive authentication is asked for).
CALL_TIMEOUT = 10.0
# The unique bus name of the caller of the method call being handled.
CALLER: ContextVar[str | None] = ContextVar("spinbox_caller", default=None)


class Authorizer:
    def __init__(self, bus: MessageBus, action: str = POLKIT_ACTION, timeout: float = CALL_TIMEOUT) -> None:
        self.bus = bus
        self.action = action
        self.timeout = timeout

    async def _call(
        self, destination: str, path: str, interface: str, member: str, sig: str, body: list[Any]
    ) -> Message:
        try:
            return await dbuscall.call(
                self.bus, destination, path, interface, member, sig, body, self.timeout
            )
        except TimeoutError:
            raise AccessDenied(f"{destination} did not answer {member} within {self.timeout:g} s") from None

    async def caller_uid(self, sender: str, what: str) -> int:
        """The uid of the connection `sender`, as the bus knows it."""
        reply = await self._call(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetConnectionUnixUser",
            "s",
            [sender],
        )
        if reply.message_type == MessageType.ERROR:
            raise AccessDenied(f"{what} is denied: the caller's user cannot be determined")
        return int(reply.body[0])

    async def check(self, sender: str, what: str, action: str | None = None) -> None:
        """Return when `sender` may do `what` (polkit's `action`); raise AccessDenied otherwise."""
        uid = await self.caller_uid(sender, what)
        if uid == 0:
            return
        await self.ask_polkit(sender, uid, what, action or self.action)

    async def ask_polkit(self, sender: str, uid: int, what: str, action: str) -> None:
        """Return when polkit authorizes `sender` (of `uid`) for `action`; raise AccessDenied otherwise."""
        subject = ["system-bus-name", {"name": Variant("s", sender)}]
        reply = await self._call(
            POLKIT,
            "/org/freedesktop/PolicyKit1/Authority",
            "org.freedesktop.PolicyKit1.Authority",
            "CheckAuthorization",
            "(sa{sv})sa{ss}us",
            [subject, action, {}, 0, ""],
        )
        if reply.message_type == MessageType.ERROR:
            log.info("polkit cannot decide for uid %d (%s): %s", uid, reply.error_name, reply.body)
            raise AccessDenied(f"{what} is denied: only root may do that (polkit is not available)")
        authorized, _challenge, _details = reply.body[0]
        if not authorized:
            raise AccessDenied(f"{what} is denied: uid {uid} is not authorized for {action}")


def record_caller(msg: Message) -> None:
    """A bus message handler (MessageBus.add_message_handler) that notes the
    sender of each method call for the handler dbus-fast runs next.

    dbus-fast starts an async method's task right after the message handlers,
    in the same turn of the loop: the task's copy of the context holds its own
    caller. The handler never claims the message.
    """
    if msg.message_type == MessageType.METHOD_CALL:
        CALLER.set(str(msg.sender))


async def authorize(authorizer: Authorizer, what: str) -> None:
    """Return when the caller of the method running now may do `what`; AccessDenied otherwise."""
    sender = CALLER.get()
    if sender is None:
        raise AccessDenied(f"{what} is denied: the caller is not known")
    try:
        await authorizer.check(sender, what)
    except AccessDenied:
        raise
    except Exception as e:
        log.exception("authorizing %s failed", what)
        raise AccessDenied(f"{what} is denied: the caller could not be checked ({e})") from None


class SpecGuard:
    """A bus message handler that answers reads of private properties only once authorized.

    It holds back a Properties.Get of a private property, a Properties.GetAll
    of an interface that has some, and ObjectManager.GetManagedObjects, asks
    about the caller, and then dispatches the call again or answers it itself
    (AccessDenied, or a GetAll without the private properties).
    """

    def __init__(self, bus: MessageBus, authorizer: Authorizer, private: dict[str, set[str]]) -> None:
        self.bus = bus
        self.authorizer = authorizer
        self.private = private  # interface name -> properties carrying a spec
        self._cleared: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def _judged(self, msg: Message) -> str | None:
        """What a call reads that needs authorizing, or None when it reads nothing private."""
        if msg.interface == OBJECT_MANAGER and msg.member == "GetManagedObjects" and self.private:
            return "reading every VM's properties"
        if msg.interface == PROPERTIES and msg.member in ("Get", "GetAll") and msg.body:
            interface = msg.body[0]
            private = self.private.get(interface if isinstance(interface, str) else "", set())
            if not private:
                return None
            if msg.member == "Get":
                if msg.signature != "ss" or msg.body[1] not in private:
                    return None
                return f"reading {msg.body[1]}"
            return f"reading {', '.join(sorted(private))}"
        return None

    def __call__(self, msg: Message) -> bool | None:
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        judged = self._judged(msg)
        if judged is None:
            return None
        key = (str(msg.sender), msg.serial)
        if key in self._cleared:
            self._cleared.discard(key)
            return None
        task = asyncio.get_running_loop().create_task(self._authorize(msg, judged))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _authorize(self, msg: Message, what: str) -> None:
        try:
            await self.authorizer.check(str(msg.sender), what, READ_SPEC_ACTION)
        except AccessDenied as e:
            if msg.member == "GetAll":
                self._get_all_public(msg)
            else:
                self.bus.send(Message.new_error(msg, e.type, e.text))
            return
        except Exception as e:
            log.exception("authorizing %s failed", msg.member)
            self.bus.send(Message.new_error(msg, "org.freedesktop.DBus.Error.AccessDenied", str(e)))
            return
        self._cleared.add((str(msg.sender), msg.serial))
        # Dispatch it again; this time the guard lets it pass.
        self.bus._process_message(msg)

    def _get_all_public(self, msg: Message) -> None:
        """Answer a GetAll with the interface's properties less its private ones."""
        interface_name = msg.body[0]
        interface = next(
            (i for i in self.bus._path_exports.get(str(msg.path), []) if i.name == interface_name), None
        )
        if interface is None:
            self.bus.send(
                Message.new_error(
                    msg, "org.freedesktop.DBus.Error.UnknownObject", f"no {interface_name} here"
                )
            )
            return
        hidden = self.private.get(interface_name, set())

        def reply(_interface: Any, values: dict[str, Variant], _data: Any, error: Exception | None) -> None:
            if error is not None:
                self.bus.send(Message.new_error(msg, "org.freedesktop.DBus.Error.Failed", str(error)))
                return
            public = {name: value for name, value in values.items() if name not in hidden}
            self.bus.send(Message.new_method_return(msg, "a{sv}", [public]))

        ServiceInterface._get_all_property_values(interface, reply)


class SpecHidingBus(MessageBus):
    """A MessageBus whose ObjectManager.InterfacesAdded leaves out the private properties.

    dbus-fast broadcasts that signal with every property's value when an
    object is exported, and anyone may subscribe to a service's signals.
    Its messages are valid whatever text they carry, and go in the order sent
    (spinbox.daemon.buswriter).
    """

    private: dict[str, set[str]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writer = BusWriter(self)

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        hidden = self.private.get(interface.name, set())

        def send(_interface: Any, values: dict[str, Variant], _data: Any, error: Exception | None) -> None:
            if error is not None:
                log.error(
                    "InterfacesAdded for %s at %s leaves out properties: %s", interface.name, path, error
                )
            public = {name: value for name, value in values.items() if name not in hidden}
            self.send(
                Message.new_signal(
                    path=path,
                    interface=OBJECT_MANAGER,
                    member="InterfacesAdded",
                    signature="oa{sa{sv}}",
                    body=[path, {interface.name: public}],
                )
            )

        ServiceInterface._get_all_property_values(interface, send)
