"""Who may change state: root, and where polkit runs, whoever it authorizes.

dbus-fast's method handlers do not see the caller, so spinboxd installs a
message handler that holds back every state-changing call, checks its sender
(GetConnectionUnixUser, then polkit's CheckAuthorization), and then lets the
call through to the interface or answers AccessDenied.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio.message_bus import MessageBus

from spinbox.daemon.errors import AccessDenied

log = logging.getLogger(__name__)

POLKIT_ACTION = "org.spinstack.spinbox.manage"
POLKIT = "org.freedesktop.PolicyKit1"


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


class AuthorizingFilter:
    """A bus message handler that lets state-changing calls through only once authorized."""

    def __init__(self, bus: MessageBus, authorizer: Authorizer, guarded: dict[str, set[str]]) -> None:
        self.bus = bus
        self.authorizer = authorizer
        self.guarded = guarded  # interface name -> guarded method names
        self._cleared: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, msg: Message) -> bool | None:
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        if msg.member not in self.guarded.get(msg.interface or "", ()):
            return None
        key = (str(msg.sender), msg.serial)
        if key in self._cleared:
            self._cleared.discard(key)
            return None
        task = asyncio.get_running_loop().create_task(self._authorize(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _authorize(self, msg: Message) -> None:
        try:
            await self.authorizer.check(str(msg.sender), f"{msg.member}")
        except AccessDenied as e:
            self.bus.send(Message.new_error(msg, e.type, e.text))
            return
        except Exception as e:
            log.exception("authorizing %s failed", msg.member)
            self.bus.send(Message.new_error(msg, "org.freedesktop.DBus.Error.AccessDenied", str(e)))
            return
        self._cleared.add((str(msg.sender), msg.serial))
        # Dispatch it again; this time the filter lets it pass.
        self.bus._process_message(msg)
