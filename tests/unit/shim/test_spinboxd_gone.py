"""A spinboxd that ends in the middle of a call (killed, restarted) gives the
shim a sentence saying so, as an UNAVAILABLE error, not the bus's own words only;
a stop it ended in is followed through its restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from spinbox.busclient import NO_REPLY, BusClient, SpinboxdError, method_call
from spinbox.buswire import Message, MessageType
from spinbox.shim.errors import spinboxd_error
from spinbox.shim.spinboxd import Spinboxd


class _Bus:
    connected = True

    async def call(self, message: Message) -> Message:
        return Message(
            message_type=MessageType.ERROR,
            error_name=NO_REPLY,
            reply_serial=1,
            signature="s",
            body=["Message recipient disconnected from message bus without replying"],
        )


def test_a_call_spinboxd_never_answered_says_spinboxd_ended() -> None:
    client = BusClient(_Bus())  # type: ignore[arg-type]

    async def call() -> Any:
        return await client.call("/org/spinstack/Spinbox", "org.spinstack.Spinbox.Manager", "CreateVM")

    try:
        asyncio.run(call())
    except SpinboxdError as error:
        shim_error = spinboxd_error(error, "cannot create the VM for 'c1'")
    else:
        raise AssertionError("the call did not fail")
    assert shim_error.code == "UNAVAILABLE"
    assert shim_error.message == (
        "cannot create the VM for 'c1': spinboxd ended before it answered CreateVM (Message recipient "
        "disconnected from message bus without replying); systemd starts it again, and the new "
        "spinboxd finishes or undoes what the call had begun"
    )


def test_a_stop_spinboxd_ended_in_is_followed_through_its_restart(tmp_path: Path) -> None:
    answers: list[Any] = [
        ["/org/spinstack/Spinbox/vm/default_2dc1"],  # GetVM
        SpinboxdError(NO_REPLY, "spinboxd ended before it answered Stop"),  # Stop
        SpinboxdError("org.freedesktop.DBus.Error.ServiceUnknown", "not on the bus yet"),  # GetVM
        SpinboxdError(
            "org.spinstack.Spinbox.Error.NotFound", "there is no VM"
        ),  # GetVM: the new one finished
    ]
    asked: list[str] = []

    class Client:
        async def call(self, path: str, interface: str, member: str, *args: Any) -> list[Any]:
            asked.append(member)
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return list(answer)

    installed = tmp_path / "org.spinstack.Spinbox.service"
    installed.touch()
    asyncio.run(Spinboxd(Client(), installed).stop_vm("default-c1", 1000))  # type: ignore[arg-type]
    assert asked == ["GetVM", "Stop", "GetVM", "GetVM"]
    assert not answers


def test_a_stop_after_spinbox_was_removed_fails_at_once(tmp_path: Path) -> None:
    """No activation file: ServiceUnknown means spinboxd is gone for good, not restarting."""
    asked: list[str] = []

    class Client:
        async def call(self, path: str, interface: str, member: str, *args: Any) -> list[Any]:
            asked.append(member)
            raise SpinboxdError(
                "org.freedesktop.DBus.Error.ServiceUnknown", "not provided by any .service files"
            )

    with pytest.raises(SpinboxdError):
        asyncio.run(Spinboxd(Client(), tmp_path / "gone.service").stop_vm("default-c1", 1000, wait=30))  # type: ignore[arg-type]
    assert asked == ["GetVM"]


def test_a_bus_call_cancelled_as_its_reply_comes_is_cancelled() -> None:
    """A handler past its deadline stops at its next D-Bus call, even when that call's
    reply is already there (asyncio.wait_for on Python 3.11 would hand over the reply)."""

    async def scenario() -> None:
        reply: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

        class Bus:
            async def call(self, message: Message) -> Message:
                return await reply

        call = asyncio.create_task(method_call(Bus(), "a.b", "/", "a.b", "M", "", [], 5))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        reply.set_result(Message(path="/", member="M"))
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("listed", "kind"), [([], "NotFound"), (["/org/spinstack/Spinbox/vm/pod1"], "UnknownMethod")]
)
def test_a_member_rootfs_removed_from_a_vm_already_released_is_not_found(
    listed: list[str], kind: str
) -> None:
    """The VM's object is gone (its release wrote the rootfs back, or kept and named it): NotFound,
    which the shim's delete takes as done; an object still listed keeps the bus's error."""

    class Client:
        async def call(self, path: str, interface: str, member: str, *args: Any) -> list[Any]:
            if member == "ListVMs":
                return [listed]
            raise SpinboxdError("org.freedesktop.DBus.Error.UnknownMethod", "RemoveRootfs could not be found")

    with pytest.raises(SpinboxdError) as raised:
        asyncio.run(Spinboxd(Client()).remove_rootfs("/org/spinstack/Spinbox/vm/pod1", "m1"))  # type: ignore[arg-type]
    assert raised.value.kind.endswith(kind)
