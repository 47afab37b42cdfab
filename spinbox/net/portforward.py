"""Port-forward's host side in a pod's network namespace: a listener and a redirect rule.

containerd's CRI PortForward enters the pod's network namespace on the host
and connects to 127.0.0.1:PORT there, where the VM's traffic is not. spinboxd
opens a TCP listener on 127.0.0.1 inside the VM's namespace and adds an
iptables nat OUTPUT rule there that redirects every TCP connection to
127.0.0.1 to it; the shim, the agent channel's client, is handed the
listening socket (VM.OpenPortForward over D-Bus), accepts on it and relays
each connection into the VM (spinbox.shim.portforward).

The rule's port is recorded in the VM's network state before the rule is
added, so teardown_network (and a later spinboxd's, after a restart) removes
exactly that rule; it also goes with the namespace. A second open replaces
the first rule instead of adding another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence

from spinbox.net import netns
from spinbox.net.config import NetConfig
from spinbox.net.errors import NetworkError
from spinbox.net.masquerade import GONE
from spinbox.net.state import NetState, StateStore, check_vm_id

log = logging.getLogger("spinbox.net")

RULE_COMMENT = "spinbox port-forward"
# Connections waiting to be accepted; the shim forwards at most as many at once.
BACKLOG = 64
IPTABLES_TIMEOUT = 30.0


def redirect_rule(listen_port: int) -> list[str]:
    """The nat OUTPUT rule's match and target (after -A, -C or -D)."""
    return [
        "OUTPUT",
        "-o", "lo",
        "-d", "127.0.0.1/32",
        "-p", "tcp",
        "-m", "comment", "--comment", RULE_COMMENT,
        "-j", "REDIRECT", "--to-ports", str(listen_port),
    ]  # fmt: skip


def iptables_argv(path: str, action: str, listen_port: int) -> list[str]:
    rule = redirect_rule(listen_port)
    return ["nsenter", f"--net={path}", "iptables", "-w", "10", "-t", "nat", action, *rule]


async def run_iptables(argv: Sequence[str], timeout: float = IPTABLES_TIMEOUT) -> tuple[int, str]:  # noqa: ASYNC109
    """(exit status, output) of one iptables run; a run past `timeout` is killed and named."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as error:
        return 127, f"cannot run {argv[0]}: {error.strerror}"
    try:
        async with asyncio.timeout(timeout):
            output, _ = await process.communicate()
    except BaseException as error:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        if isinstance(error, TimeoutError):
            return -1, f"iptables did not finish within {timeout:g} s"
        raise
    return process.returncode or 0, output.decode(errors="replace").strip()


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def remove_rule(path: str, listen_port: int) -> str | None:
    """Deletes the rule to `listen_port` from the namespace; a rule already gone is fine.
    Returns the problem as a sentence, or None."""
    status, output = await run_iptables(iptables_argv(path, "-D", listen_port))
    if status == 0 or any(marker in output for marker in GONE):
        return None
    return (
        f"cannot remove the port-forward rule (to port {listen_port}) from the network namespace {path}: "
        f"{output or f'exit status {status}'}"
    )


async def open_port_forward(vm_id: str, config: NetConfig | None = None) -> socket.socket:
    """A listening TCP socket on 127.0.0.1 in VM `vm_id`'s network namespace, with the rule
    that sends the namespace's connections to 127.0.0.1 to it. On failure nothing is left."""
    config = config or NetConfig()
    check_vm_id(vm_id)
    store = StateStore(config.state_dir)
    state = store.load(vm_id)
    if state is None or not state.netns:
        raise NetworkError(f"VM {vm_id} has no network namespace to forward ports from")
    path = state.netns
    if state.forward_port:
        problem = await remove_rule(path, state.forward_port)
        if problem is not None:
            raise NetworkError(problem)
        state = _saved(store, state.evolve(forward_port=0))
    try:
        sock = await netns.run_in_async(path, _listener)
    except OSError as error:
        raise NetworkError(
            f"cannot listen for port-forward in the network namespace {path} of VM {vm_id}: {error}"
        ) from None
    try:
        port = int(sock.getsockname()[1])
        state = _saved(store, state.evolve(forward_port=port))
        status, output = await run_iptables(iptables_argv(path, "-A", port))
        if status != 0:
            raise NetworkError(
                f"cannot add the port-forward rule to the network namespace {path} of VM {vm_id}: "
                f"{output or f'exit status {status}'}"
            )
    except BaseException:
        sock.close()
        if state.forward_port:
            # A run killed at its deadline (or cancelled) may have added the rule.
            problem = await remove_rule(path, state.forward_port)
            if problem is None:
                _saved(store, state.evolve(forward_port=0))
            else:
                log.error("VM %s: %s", vm_id, problem)
        raise
    log.info("VM %s: port-forward listens on 127.0.0.1:%d in %s", vm_id, port, path)
    return sock


def _saved(store: StateStore, state: NetState) -> NetState:
    store.save(state)
    return state
