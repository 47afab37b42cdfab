"""TAP devices redirected to a namespace's interfaces, and what the guest needs to know.

For every Ethernet interface of a namespace (the veth that CNI or a CRI
runtime made), spinbox creates a TAP beside it and joins the two with tc:
an ingress qdisc on each with a match-everything u32 filter whose action is
`mirred egress redirect` to the other. Frames arriving on the interface go
out to QEMU through the TAP, and frames from the guest go out of the
interface, so the interface's peer sees the guest as the container.

The guest NIC takes the interface's MAC: the peer (bridge, neighbours, ARP
caches, the CNI plugins' state) already knows the container by that MAC and
the guest answers ARP for the interface's addresses with it. The interface
keeps its MAC and addresses (CNI CHECK and DEL still find them), but its own
stack no longer sees incoming traffic, which all goes to the guest.

Every function here runs inside the namespace (see netns.run_in).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import struct
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.protocols import ETH_P_ALL

from spinbox.net import netns

# TAP names spinbox gives its devices (the namespace is the container's, so
# they only need to differ from what a CNI plugin or a CRI runtime names).
TAP_PREFIX = "sbx-tap"

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
# Frames carry a virtio_net_hdr: QEMU sees the flag on the fd and then passes
# checksum/segmentation offloads through to the guest's virtio-net.
IFF_VNET_HDR = 0x4000

ARPHRD_ETHER = 1
IFF_LOOPBACK = 0x8
RTPROT_KERNEL = 2
RTN_UNICAST = 1
RT_TABLE_MAIN = 254
INGRESS = 0xFFFF0000


@dataclass(frozen=True)
class RouteInfo:
    destination: str  # CIDR
    gateway: str  # "" for an on-link route


@dataclass(frozen=True)
class LinkInfo:
    """An interface of a namespace as the guest should reproduce it."""

    name: str
    index: int
    mac: str
    mtu: int
    addresses: tuple[str, ...]  # CIDR
    routes: tuple[RouteInfo, ...]


def inspect_links() -> list[LinkInfo]:
    """The namespace's Ethernet interfaces (not loopback, not spinbox's TAPs), by ifindex."""
    with IPRoute() as ipr:
        links = []
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if link["ifi_type"] != ARPHRD_ETHER or link["flags"] & IFF_LOOPBACK:
                continue
            if name.startswith(TAP_PREFIX):
                continue
            index = link["index"]
            links.append(
                LinkInfo(
                    name=name,
                    index=index,
                    mac=link.get_attr("IFLA_ADDRESS"),
                    mtu=link.get_attr("IFLA_MTU"),
                    addresses=_addresses(ipr, index),
                    routes=_routes(ipr, index),
                )
            )
        return sorted(links, key=lambda info: info.index)


def _addresses(ipr: IPRoute, index: int) -> tuple[str, ...]:
    found = []
    for msg in ipr.get_addr(index=index):
        address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if not address:
            continue
        interface = ipaddress.ip_interface(f"{address}/{msg['prefixlen']}")
        # The guest derives its own IPv6 link-local address from the same MAC.
        if interface.version == 6 and interface.ip.is_link_local:
            continue
        found.append(str(interface))
    return tuple(found)


def _routes(ipr: IPRoute, index: int) -> tuple[RouteInfo, ...]:
    on_link: list[RouteInfo] = []
    via: list[RouteInfo] = []
    for msg in ipr.get_routes(table=RT_TABLE_MAIN):
        if msg.get_attr("RTA_OIF") != index or msg["type"] != RTN_UNICAST:
            continue
        # Prefix routes come with the addresses; the guest's kernel makes its own.
        if msg["proto"] == RTPROT_KERNEL:
            continue
        dst = msg.get_attr("RTA_DST")
        family_default = "0.0.0.0" if msg["family"] == 2 else "::"
        destination = str(ipaddress.ip_network(f"{dst or family_default}/{msg['dst_len']}", strict=False))
        gateway = msg.get_attr("RTA_GATEWAY") or ""
        (via if gateway else on_link).append(RouteInfo(destination=destination, gateway=gateway))
    # On-link routes first: a gateway must be reachable before a route may use it.
    return tuple(on_link + via)


def open_tap(name: str) -> int:
    """Create TAP `name` in the current namespace; returns its (close-on-exec) fd.

    The TAP is not persistent: it disappears when the last fd is closed, so a
    VM's TAP goes away with its QEMU even if nothing else cleans up.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_unconnected_taps(count: int) -> tuple[list[int], int]:
    """`count` TAPs alone in a new network namespace of their own (so that nothing on the host
    sees them): their fds, and an fd of that namespace, which lives as long as it is open."""

    def make() -> tuple[list[int], int]:
        namespace = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        taps: list[int] = []
        try:
            for index in range(count):
                taps.append(open_tap(f"{TAP_PREFIX}{index}"))
        except BaseException:
            for fd in [*taps, namespace]:
                os.close(fd)
            raise
        return taps, namespace

    return netns.in_new_namespace(make)


def plumb(link: LinkInfo, tap_name: str) -> int:
    """A TAP beside `link` with traffic redirected both ways; returns the TAP's fd."""
    fd = open_tap(tap_name)
    try:
        with IPRoute() as ipr:
            (tap_index,) = ipr.link_lookup(ifname=tap_name)
            _quiet_ipv6(tap_name)
            ipr.link("set", index=tap_index, mtu=link.mtu, state="up")
            _redirect(ipr, link.index, tap_index)
            _redirect(ipr, tap_index, link.index)
    except BaseException:
        os.close(fd)
        unplumb(link.name, tap_name)
        raise
    return fd


def _quiet_ipv6(name: str) -> None:
    """No IPv6 on the TAP itself: its own link-local address and solicitations must not reach the guest."""
    # /proc/sys/net shows the namespace of the thread that opens it.
    with contextlib.suppress(OSError), open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
        f.write("1")


def _redirect(ipr: IPRoute, source: int, target: int) -> None:
    """Everything arriving on `source` leaves through `target`."""
    try:
        ipr.tc("add", "ingress", source, "ffff:")
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
    ipr.tc(
        "add-filter",
        "u32",
        source,
        parent=INGRESS,
        protocol=ETH_P_ALL,
        keys=["0x0/0x0+0"],
        target=0x10001,
        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target},
    )


def unplumb(link_name: str, tap_name: str) -> None:
    """Undo plumb(): remove the TAP and the interface's ingress qdisc (with its filters).

    Devices that are already gone are fine: teardown must be repeatable.
    """
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=tap_name):
            _ignore_gone(lambda i=index: ipr.link("del", index=i))
        for index in ipr.link_lookup(ifname=link_name):
            _ignore_gone(lambda i=index: ipr.tc("del", "ingress", i, "ffff:"))


def tap_names() -> list[str]:
    """spinbox's TAPs in the current namespace."""
    with IPRoute() as ipr:
        names = (link.get_attr("IFLA_IFNAME") for link in ipr.get_links())
        return [name for name in names if name.startswith(TAP_PREFIX)]


def _ignore_gone(action: object) -> None:
    try:
        action()  # type: ignore[operator]
    except NetlinkError as e:
        if e.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            raise
