"""A VM's network: set up from a namespace, torn down from its state file.

Two cases, one path:
- the VM's namespace has Ethernet interfaces (nerdctl's hook, a CRI runtime):
  each gets a TAP beside it (see tap.py) and the guest gets its configuration;
- it has none, or there is none (plain `ctr run`): spinbox runs its own CNI
  network list in the namespace (creating one when there is none) and then
  proceeds as above with the interface CNI made.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from spinbox.api.proto import agent_pb2
from spinbox.net import cni, conflist, masquerade, netns, portforward, tap
from spinbox.net.config import NetConfig
from spinbox.net.errors import NetworkError
from spinbox.net.state import CniState, NetState, StateStore, TapState, check_vm_id
from spinbox.vm import Nic

log = logging.getLogger("spinbox.net")

NETNS_PREFIX = "spinbox-"
RESOLV_CONF = Path("/etc/resolv.conf")
# Where systemd-resolved keeps the real servers behind its 127.0.0.53 stub.
RESOLVED_UPSTREAM = Path("/run/systemd/resolve/resolv.conf")


@dataclass(frozen=True)
class VmNetwork:
    """What setup_network gives spinboxd.

    nics: one spinbox.vm.Nic per guest NIC, in order; the fds (IFF_VNET_HDR,
        close-on-exec) are the daemon's to pass to QEMU and to close() afterwards
        (QEMU keeps its own copies).
    guest: the agent's ConfigureNetwork request.
    netns: the namespace the TAPs live in ("" with networking off).
    """

    vm_id: str
    nics: list[Nic]
    guest: agent_pb2.NetworkConfig
    netns: str = ""
    result: dict[str, Any] | None = field(default=None, compare=False)
    _open: set[int] = field(default_factory=set, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._open.update(nic.tap_fd for nic in self.nics)

    def close(self) -> None:
        """Close the TAP fds; only the first call does (their numbers may be reused afterwards)."""
        while self._open:
            with contextlib.suppress(OSError):
                os.close(self._open.pop())


def _store(config: NetConfig) -> StateStore:
    return StateStore(config.state_dir)


def _owned_path(config: NetConfig, vm_id: str) -> Path:
    return config.netns_dir / f"{NETNS_PREFIX}{vm_id}"


async def prepare_netns(vm_id: str, config: NetConfig | None = None) -> tuple[str, int]:
    """A namespace held by spinbox for the VM, and the pid of a process inside it.

    OCI hooks (nerdctl's createRuntime) configure it through /proc/<pid>/ns/net
    before CreateVM; setup_network then finds its interfaces. It is removed by
    teardown_network with the rest of the VM's network.
    """
    config = config or NetConfig()
    check_vm_id(vm_id)
    store = _store(config)
    if store.load(vm_id) is not None:
        raise NetworkError(f"VM {vm_id} already has a network")
    state = NetState(vm_id=vm_id, netns=str(_owned_path(config, vm_id)), owned=True)
    store.save(state)
    try:
        await _create_netns(Path(state.netns))
        pid, started = await asyncio.to_thread(netns.start_holder, Path(state.netns))
        store.save(state.evolve(holder_pid=pid, holder_start=started))
    except BaseException as e:
        await teardown_network(vm_id, config)
        raise _as_network_error(e, f"cannot prepare a network namespace for VM {vm_id}") from None
    return state.netns, pid


async def setup_network(vm_id: str, netns_path: str | None, config: NetConfig | None = None) -> VmNetwork:
    """Give VM `vm_id` the network of `netns_path` (None: spinbox's default network).

    On failure everything taken for the VM is given back (including a namespace
    from prepare_netns) and NetworkError says why.
    """
    config = config or NetConfig()
    check_vm_id(vm_id)
    netns_path = netns_path or None
    if not config.enabled:
        return VmNetwork(vm_id=vm_id, nics=[], guest=agent_pb2.NetworkConfig())
    store = _store(config)
    state = store.load(vm_id) or NetState(vm_id=vm_id)
    if state.taps or state.cni is not None:
        raise NetworkError(f"VM {vm_id} already has a network")
    nics: list[Nic] = []
    try:
        if netns_path is None and not state.owned:
            # Validate the network list before creating anything for it.
            conflist.load(config)
            state = state.evolve(netns=str(_owned_path(config, vm_id)), owned=True)
            store.save(state)
            await _create_netns(Path(state.netns))
        elif netns_path is not None and netns_path != state.netns:
            if state.owned:
                raise NetworkError(f"VM {vm_id} has a prepared namespace {state.netns}, not {netns_path}")
            await asyncio.to_thread(_check_netns, netns_path)
            state = state.evolve(netns=netns_path)
            store.save(state)
        links = await netns.run_in_async(state.netns, tap.inspect_links)
        result = None
        if not links:
            state, result = await _run_cni(store, state, config)
            links = await netns.run_in_async(state.netns, tap.inspect_links)
            if not links:
                raise NetworkError(f"the CNI network made no Ethernet interface in {state.netns}")
        for i, link in enumerate(links):
            tap_name = f"{tap.TAP_PREFIX}{i}"
            state = state.evolve(taps=(*state.taps, TapState(link=link.name, tap=tap_name)))
            store.save(state)
            try:
                fd = await netns.run_in_async(state.netns, functools.partial(tap.plumb, link, tap_name))
            except Exception as e:
                context = f"cannot create TAP {tap_name} for {link.name} in {state.netns}"
                raise _as_network_error(e, context) from None
            nics.append(Nic(tap_fd=fd, mac=link.mac))
        guest = guest_config(links, cni.parse_result(result) if result else None)
    except BaseException as e:
        for nic in nics:
            os.close(nic.tap_fd)
        try:
            await teardown_network(vm_id, config)
        except NetworkError as cleanup:
            log.warning("cleanup after a failed network setup for VM %s: %s", vm_id, cleanup)
        raise _as_network_error(e, f"cannot set up the network of VM {vm_id}") from None
    return VmNetwork(vm_id=vm_id, nics=nics, guest=guest, netns=state.netns, result=result)


async def _run_cni(store: StateStore, state: NetState, config: NetConfig) -> tuple[NetState, dict[str, Any]]:
    networks = conflist.load(config)
    cni_state = CniState(
        conflist=networks.to_json(),
        plugin_path=tuple(str(p) for p in config.plugin_path),
        ifname="eth0",
    )
    state = state.evolve(cni=cni_state)
    store.save(state)
    attachment = cni.Attachment(container_id=state.vm_id, netns=state.netns, ifname=cni_state.ifname)
    result = await cni.add(networks, attachment, config.plugin_path)
    state = state.evolve(cni=dataclasses.replace(cni_state, result=result))
    store.save(state)
    return state, result


async def teardown_network(vm_id: str, config: NetConfig | None = None) -> None:
    """Give back everything VM `vm_id`'s network took; doing it twice is fine."""
    config = config or NetConfig()
    check_vm_id(vm_id)
    store = _store(config)
    state = store.load(vm_id)
    if state is None:
        return
    errors: list[str] = []
    present = await asyncio.to_thread(_netns_present, state)
    if state.forward_port and present:
        problem = await portforward.remove_rule(state.netns, state.forward_port)
        if problem is not None:
            errors.append(problem)
    if state.taps and present:
        taps = state.taps

        def unplumb_all() -> None:
            for t in taps:
                tap.unplumb(t.link, t.tap)

        try:
            await netns.run_in_async(state.netns, unplumb_all)
        except Exception as e:
            errors.append(f"removing TAPs: {e}")
    if state.cni is not None:
        try:
            await _cni_del(state.cni, vm_id, state.netns if present else "")
        except NetworkError as e:
            if state.cni.result is not None:
                errors.append(str(e))
            else:
                # After a failed ADD some plugins fail DEL on what they never made
                # (the bridge plugin's masquerade chain); retrying cannot help.
                log.warning("CNI DEL after a failed ADD for VM %s: %s", vm_id, e)
        if not present and state.cni.result is not None:
            # Without the namespace the bridge plugin cannot find what it masqueraded.
            rules = masquerade.masquerade_rules(state.cni.conflist, vm_id, state.cni.result)
            errors += await masquerade.remove_masquerade(rules)
    netns.stop_holder(state.holder_pid, state.holder_start)
    if state.owned and state.netns:
        try:
            await asyncio.to_thread(netns.remove, Path(state.netns))
        except OSError as e:
            errors.append(f"removing namespace {state.netns}: {e.strerror}")
    if errors:
        # The state file stays so that collect_leftovers tries again.
        raise NetworkError(f"incomplete teardown of the network of VM {vm_id}: {'; '.join(errors)}")
    store.remove(vm_id)


def _netns_present(state: NetState) -> bool:
    if not state.netns:
        return False
    if state.owned:
        return netns.is_pinned(Path(state.netns))
    return os.path.exists(state.netns)


async def _cni_del(cni_state: CniState, container_id: str, netns_path: str) -> None:
    networks = conflist.ConfList.from_json(cni_state.conflist)
    attachment = cni.Attachment(container_id=container_id, netns=netns_path, ifname=cni_state.ifname)
    await cni.delete(networks, attachment, tuple(Path(p) for p in cni_state.plugin_path), cni_state.result)


async def collect_leftovers(live_vm_ids: Iterable[str], config: NetConfig | None = None) -> list[str]:
    """Remove what a crash left for VMs that are not running; returns what was removed.

    Namespaces and TAPs named by state files, spinbox's namespaces without one,
    and host-local leases of spinbox's network that no live VM holds.
    """
    config = config or NetConfig()
    live = set(live_vm_ids)
    store = _store(config)
    collected: list[str] = []
    for vm_id in store.vm_ids():
        if vm_id in live:
            continue
        try:
            await teardown_network(vm_id, config)
            collected.append(f"network of VM {vm_id}")
        except NetworkError as e:
            log.warning("%s", e)
    orphans: dict[str, Path] = {}
    if config.netns_dir.is_dir():
        for path in sorted(config.netns_dir.iterdir()):
            vm_id = path.name.removeprefix(NETNS_PREFIX)
            if path.name.startswith(NETNS_PREFIX) and vm_id not in live and store.load(vm_id) is None:
                orphans[vm_id] = path
    # Leases first, while their namespaces still exist: the bridge plugin's DEL
    # finds the addresses whose masquerading it removes on the interface.
    collected += await _collect_leases(live, orphans, config)
    for path in orphans.values():
        await asyncio.to_thread(netns.remove, path)
        collected.append(f"namespace {path}")
    return collected


async def _collect_leases(live: set[str], orphans: dict[str, Path], config: NetConfig) -> list[str]:
    if not config.enabled:
        return []
    try:
        networks = conflist.load(config)
    except NetworkError as e:
        log.warning("not collecting CNI leases: %s", e)
        return []
    collected = []
    for directory in conflist.lease_dirs(networks):
        # Only spinbox's own lease directory: a conflist may share one with other runtimes.
        if not directory.is_relative_to(config.lease_dir) or not directory.is_dir():
            continue
        for lease in sorted(directory.iterdir()):
            owner = _lease_owner(lease)
            if owner is None or owner[0] in live:
                continue
            container_id, ifname = owner
            orphan = orphans.get(container_id)
            attachment = cni.Attachment(
                container_id=container_id, netns=str(orphan) if orphan else "", ifname=ifname
            )
            try:
                await cni.delete(networks, attachment, config.plugin_path, None)
            except NetworkError as e:
                log.warning("CNI DEL for leftover lease %s: %s", lease, e)
            lease.unlink(missing_ok=True)
            collected.append(f"lease {lease.name} of {container_id}")
    return collected


def _lease_owner(path: Path) -> tuple[str, str] | None:
    """(container id, ifname) of a host-local lease file; None for its other files."""
    try:
        ipaddress.ip_address(path.name)
    except ValueError:
        return None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    if not lines or not lines[0].strip():
        return None
    return lines[0].strip(), (lines[1].strip() if len(lines) > 1 else "eth0")


def guest_config(links: list[tap.LinkInfo], result: cni.CniResult | None) -> agent_pb2.NetworkConfig:
    """The guest's network: the namespace's interfaces and routes, and DNS."""
    config = agent_pb2.NetworkConfig()
    for link in links:
        config.interfaces.add(name=link.name, mac=link.mac, mtu=link.mtu, addresses=list(link.addresses))
    for link in links:
        for route in link.routes:
            config.routes.add(destination=route.destination, gateway=route.gateway, device=link.name)
    dns = result.dns if result is not None and result.dns.nameservers else host_dns()
    config.nameservers.extend(dns.nameservers)
    config.search.extend(dns.search or ((dns.domain,) if dns.domain else ()))
    config.dns_options.extend(dns.options)
    return config


def host_dns(path: Path = RESOLV_CONF, upstream: Path = RESOLVED_UPSTREAM) -> cni.Dns:
    """The host's DNS settings without loopback servers (unreachable from a guest)."""
    dns = parse_resolv_conf(path)
    if not dns.nameservers and path == RESOLV_CONF and upstream.exists():
        dns = parse_resolv_conf(upstream)
    return dns


def parse_resolv_conf(path: Path) -> cni.Dns:
    try:
        text = path.read_text()
    except OSError:
        return cni.Dns()
    nameservers: list[str] = []
    search: list[str] = []
    options: list[str] = []
    domain = ""
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2:
            continue
        key, values = words[0], words[1:]
        if key == "nameserver":
            try:
                address = ipaddress.ip_address(values[0].split("%", 1)[0])
            except ValueError:
                continue
            if not address.is_loopback:
                nameservers.append(values[0])
        elif key == "search":
            search = values
        elif key == "domain":
            domain = values[0]
        elif key == "options":
            options += values
    return cni.Dns(
        nameservers=tuple(nameservers), domain=domain, search=tuple(search), options=tuple(options)
    )


async def _create_netns(path: Path) -> None:
    try:
        await asyncio.to_thread(netns.create, path)
    except OSError as e:
        raise NetworkError(f"cannot create network namespace {path}: {e.strerror}") from None


def _check_netns(path: str) -> None:
    if not os.path.exists(path):
        raise NetworkError(f"network namespace {path} does not exist")
    try:
        netns.run_in(path, lambda: None)
    except OSError:
        raise NetworkError(f"{path} is not a network namespace") from None


def _as_network_error(e: BaseException, context: str) -> BaseException:
    if isinstance(e, NetworkError):
        return e
    if isinstance(e, NetlinkError):
        return NetworkError(f"{context}: {os.strerror(e.code)}")
    if isinstance(e, OSError) and e.strerror:
        return NetworkError(f"{context}: {e.strerror}")
    if isinstance(e, Exception):
        return NetworkError(f"{context}: {e}")
    return e
