"""The guest's network, configured from the host's NetworkConfig.

Inside the VM there is no udev and no `ip`: NICs are found by MAC, and
links, addresses and routes are set over rtnetlink (AF_NETLINK) with the few
messages needed here. Everything the host sends is checked first, so a
bad request changes nothing.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from spinbox.api.proto import agent_pb2

T = TypeVar("T")

# A plain string, not pathlib: the guest image keeps its Python small.
# How long a NIC plugged into a VM restored from a template may take to show up.
NIC_WAIT = 10.0
ETC = "/etc"

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_addr.h>, <linux/if_link.h>
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_DUMP = 0x300
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
IFA_F_NODAD = 0x02
IFA_F_PERMANENT = 0x80
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
IFF_UP = 0x1

# The MAC of a template's NIC slots (spinbox.vm.qemu.SLOT_MAC): a NIC that has it is unclaimed.
SLOT_MAC = "02:53:42:00:00:00"
_IFNAME = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9\-.]{0,62})?$")


class NetworkConfigError(ValueError):
    """The host sent a configuration that cannot be applied; str() says what is wrong."""


def apply(config: agent_pb2.NetworkConfig, etc: str | os.PathLike[str] = ETC, nic_wait: float = 0.0) -> None:
    """Configure the guest: NICs (found by MAC, waiting up to `nic_wait` seconds for
    each to show up), addresses, routes, DNS, /etc/hosts, hostname."""
    validate(config)
    with Netlink() as nl:
        nl.set_link(socket.if_nametoindex("lo"), up=True)
        indexes: dict[str, int] = {}
        for iface in config.interfaces:
            index = find_by_mac(nl, iface.mac, nic_wait)
            _free_name(nl, iface.name, index)
            nl.set_link(index, up=False)
            nl.set_link(index, name=iface.name, mtu=iface.mtu or None)
            nl.set_link(index, up=True)
            for address in iface.addresses:
                nl.add_address(index, ipaddress.ip_interface(address))
            indexes[iface.name] = index
        for route in config.routes:
            nl.add_route(
                indexes[route.device],
                _network(route.destination),
                ipaddress.ip_address(route.gateway) if route.gateway else None,
            )
    write_files(config, etc)
    if config.hostname:
        socket.sethostname(config.hostname)


def loopback_up() -> None:
    """Bring the loopback interface up (OSError if the kernel refuses)."""
    with Netlink() as nl:
        nl.set_link(socket.if_nametoindex("lo"), up=True)


def validate(config: agent_pb2.NetworkConfig) -> None:
    names = set()
    for iface in config.interfaces:
        if not _IFNAME.match(iface.name):
            raise NetworkConfigError(f"invalid interface name {iface.name!r}")
        if iface.name in names:
            raise NetworkConfigError(f"interface {iface.name} is named twice")
        names.add(iface.name)
        if not _MAC.match(iface.mac.lower()):
            raise NetworkConfigError(f"interface {iface.name} has an invalid MAC {iface.mac!r}")
        if iface.mtu and not 68 <= iface.mtu <= 65535:
            raise NetworkConfigError(f"interface {iface.name} has an invalid MTU {iface.mtu}")
        for address in iface.addresses:
            _parse(ipaddress.ip_interface, address, f"address of {iface.name}")
    for route in config.routes:
        if route.device not in names:
            raise NetworkConfigError(f"route to {route.destination} uses unknown interface {route.device!r}")
        destination = _parse(_network, route.destination, "route destination")
        if route.gateway:
            gateway = _parse(ipaddress.ip_address, route.gateway, "route gateway")
            if gateway.version != destination.version:
                raise NetworkConfigError(f"route to {route.destination} has a gateway of another family")
    for server in config.nameservers:
        _parse(ipaddress.ip_address, server, "nameserver")
    for word in (*config.search, *config.dns_options):
        if not word or any(c.isspace() for c in word):
            raise NetworkConfigError(f"invalid DNS search domain or option {word!r}")
    if config.hostname and not _HOSTNAME.match(config.hostname):
        raise NetworkConfigError(f"invalid hostname {config.hostname!r}")
    for entry in config.hosts:
        _parse(ipaddress.ip_address, entry.address, "hosts entry")
        if not entry.names or not all(name and not any(c.isspace() for c in name) for name in entry.names):
            raise NetworkConfigError(f"hosts entry {entry.address} has invalid names")


def _parse(parse: Callable[[str], T], text: str, what: str) -> T:
    try:
        return parse(text)
    except ValueError:
        raise NetworkConfigError(f"invalid {what}: {text!r}") from None


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


def find_by_mac(nl: Netlink, mac: str, wait: float = 0.0) -> int:
    """The ifindex of the NIC with MAC `mac`; a hot-plugged one shows up a moment after its plug.

    A VM restored from a template has its first NICs from the template's boot (device slots),
    with the template's MAC: the first of those still unclaimed becomes the NIC with `mac`.
    """
    wanted = bytes.fromhex(mac.replace(":", ""))
    slot = bytes.fromhex(SLOT_MAC.replace(":", ""))
    deadline = time.monotonic() + wait
    while True:
        links = nl.links()
        for index, address in links:
            if address == wanted:
                return index
        for index, address in links:
            if address == slot:
                nl.set_link(index, address=wanted)
                return index
        if time.monotonic() >= deadline:
            waited = f" (waited {wait:g} s)" if wait else ""
            raise NetworkConfigError(f"no network interface has MAC {mac}{waited}")
        time.sleep(0.02)


def _free_name(nl: Netlink, name: str, index: int) -> None:
    """Move another link off `name` (two NICs may swap names)."""
    try:
        other = socket.if_nametoindex(name)
    except OSError:
        return
    if other != index:
        nl.set_link(other, up=False)
        nl.set_link(other, name=f"tmp{other}")


def write_files(config: agent_pb2.NetworkConfig, etc: str | os.PathLike[str] = ETC) -> None:
    """/etc/resolv.conf, /etc/hosts and /etc/hostname."""
    resolv = [f"nameserver {server}" for server in config.nameservers]
    if config.search:
        resolv.append("search " + " ".join(config.search))
    if config.dns_options:
        resolv.append("options " + " ".join(config.dns_options))
    _write(os.path.join(etc, "resolv.conf"), resolv)
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    hosts += [f"{entry.address}\t{' '.join(entry.names)}" for entry in config.hosts]
    named = {name for entry in config.hosts for name in entry.names}
    if config.hostname and config.hostname not in named:
        addresses = [a for iface in config.interfaces for a in iface.addresses]
        address = str(ipaddress.ip_interface(addresses[0]).ip) if addresses else "127.0.1.1"
        hosts.append(f"{address}\t{config.hostname}")
    _write(os.path.join(etc, "hosts"), hosts)
    if config.hostname:
        _write(os.path.join(etc, "hostname"), [config.hostname])


def _write(path: str, lines: list[str]) -> None:
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)


class Netlink:
    """A NETLINK_ROUTE socket sending one request at a time and waiting for its ack."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, body: bytes) -> None:
        self.seq += 1
        header = struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0)
        self.sock.send(header + body)
        while True:
            data = self.sock.recv(65536)
            for msg_type, seq, payload in _messages(data):
                if msg_type == NLMSG_ERROR and seq == self.seq:
                    (error,) = struct.unpack_from("=i", payload)
                    if error:
                        raise OSError(-error, os.strerror(-error))
                    return

    def links(self) -> list[tuple[int, bytes]]:
        """(ifindex, hardware address) of every link."""
        self.seq += 1
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
        header = struct.pack("=IHHII", 16 + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0)
        self.sock.send(header + body)
        found: list[tuple[int, bytes]] = []
        while True:
            for msg_type, seq, payload in _messages(self.sock.recv(65536)):
                if seq != self.seq:
                    continue
                if msg_type == NLMSG_DONE:
                    return found
                if msg_type == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", payload)
                    raise OSError(-error, os.strerror(-error))
                if msg_type == RTM_NEWLINK:
                    (index,) = struct.unpack_from("=i", payload, 4)
                    found.append((index, _attrs(payload[16:]).get(IFLA_ADDRESS, b"")))

    def set_link(
        self,
        index: int,
        name: str | None = None,
        mtu: int | None = None,
        up: bool | None = None,
        address: bytes | None = None,
    ) -> None:
        change = IFF_UP if up is not None else 0
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, change)
        if name is not None:
            body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        if mtu is not None:
            body += _attr(IFLA_MTU, struct.pack("=I", mtu))
        if address is not None:
            body += _attr(IFLA_ADDRESS, address)
        self.request(RTM_NEWLINK, 0, body)

    def add_address(self, index: int, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> None:
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        flags = IFA_F_PERMANENT | (IFA_F_NODAD if address.version == 6 else 0)
        body = struct.pack("=BBBBI", family, address.network.prefixlen, flags, RT_SCOPE_UNIVERSE, index)
        body += _attr(IFA_LOCAL, address.ip.packed) + _attr(IFA_ADDRESS, address.ip.packed)
        if address.version == 4 and address.network.prefixlen < 31:
            body += _attr(IFA_BROADCAST, address.network.broadcast_address.packed)
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body)

    def add_route(
        self,
        index: int,
        destination: ipaddress.IPv4Network | ipaddress.IPv6Network,
        gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    ) -> None:
        family = socket.AF_INET if destination.version == 4 else socket.AF_INET6
        scope = RT_SCOPE_UNIVERSE if gateway is not None else RT_SCOPE_LINK
        body = struct.pack(
            "=BBBBBBBBI",
            family,
            destination.prefixlen,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            scope,
            RTN_UNICAST,
            0,
        )
        if destination.prefixlen:
            body += _attr(RTA_DST, destination.network_address.packed)
        if gateway is not None:
            body += _attr(RTA_GATEWAY, gateway.packed)
        body += _attr(RTA_OIF, struct.pack("=i", index))
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    found = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            break
        yield kind, seq, data[offset + 16 : offset + length]
        offset += (length + 3) & ~3
