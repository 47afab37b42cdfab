"""Who may change state: root, and where polkit runs, whoever it authorizes.

dbus-fast's method handlers do not see the caller, so spinboxd installs a
message handler (record_caller) that notes each call's sender in a context
variable; every state-changing method first awaits authorize(), which checks
that sender (GetConnectionUnixUser, then polkit's CheckAuthorization) and
raises AccessDenied. Only dbus-fast's public interfaces are used.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio.message_bus import MessageBus

from spinbox.daemon.errors import AccessDenied

log = logging.getLogger(__name__)

POLKIT_ACTION = "org.spinstack.spinbox.manage"
POLKIT = "org.freedesktop.PolicyKit1"
# The unique bus name of the caller of the method call being handled.
CALLER: ContextVar[str | None] = ContextVar("spinbox_caller", default=None)


class Authorizer:
    def __init__(self, bus: MessageBus, action: str = POLKIT_ACTION) -> None:
        self.bus = bus
        self.action = action

    async def _call(
        self, destination: str, path: str, interface: str, member: str, sig: str, body: list[Any]
    ) -> Message:
        reply = await self.bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=sig,
                body=body,
            )
        )
        assert reply is not None
        return reply

    async def check(self, sender: str, what: str) -> None:
        """Return when `sender` may do `what`; raise AccessDenied otherwise."""
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
        uid = reply.body[0]
        if uid == 0:
            return
        subject = ["system-bus-name", {"name": Variant("s", sender)}]
        reply = await self._call(
            POLKIT,
            "/org/freedesktop/PolicyKit1/Authority",
            "org.freedesktop.PolicyKit1.Authority",
            "CheckAuthorization",
            "(sa{sv})sa{ss}us",
            [subject, self.action, {}, 0, ""],
        )
        if reply.message_type == MessageType.ERROR:
            log.info("polkit cannot decide for uid %d (%s): %s", uid, reply.error_name, reply.body)
            raise AccessDenied(f"{what} is denied: only root may change VMs (polkit is not available)")
        authorized, _challenge, _details = reply.body[0]
        if not authorized:
            raise AccessDenied(f"{what} is denied: uid {uid} is not authorized for {self.action}")


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
