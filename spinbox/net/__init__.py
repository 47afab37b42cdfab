"""Networking for spinbox VMs: CNI, TAP devices and tc redirection.

spinboxd's interface (all coroutines; config is the [network] table as NetConfig):

    path, pid = await prepare_netns(vm_id, config)         # PrepareNetworkNamespace
    network = await setup_network(vm_id, netns, config)    # netns: a path, or None
    network.nics     -> [Nic(tap_fd, mac)] for QEMU; network.close() once QEMU has them
    network.guest    -> agent_pb2.NetworkConfig for the agent's ConfigureNetwork
    sock = await open_port_forward(vm_id, config)           # VM.OpenPortForward
    await teardown_network(vm_id, config)                  # idempotent
    await collect_leftovers(live_vm_ids, config)           # at start-up

What it does:
- A namespace with Ethernet interfaces (CRI, or nerdctl's hook in a prepared
  namespace): a TAP `sbx-tap<N>` per interface in that namespace, tc ingress +
  u32 match-all + `mirred egress redirect` both ways; the guest NIC takes the
  interface's MAC, the guest gets its addresses, routes and MTU.
- No namespace, or one without interfaces (plain `ctr run`): spinbox's own CNI
  network list (spinbox.conflist: bridge `spinbox0` with gateway and
  masquerading, host-local IPAM on 10.77.0.0/16, firewall; Debian's
  plugins in /usr/lib/cni) runs in a namespace spinbox creates
  (/run/spinbox/netns/spinbox-<id>), then the same TAP plumbing. No portmap:
  spinbox passes no port mappings, so it would only add a plugin run to every
  create and delete. 10.77.0.0/16 stays clear of the usual defaults (Docker
  172.17/16, Podman and containerd's examples 10.88/16, Podman's extra
  networks 10.89.x/24, nerdctl 10.4.0/24, Kubernetes pods and services
  10.244/16 and 10.96/12); `subnet` changes it.
- DNS: the CNI result's, else the host's resolv.conf without loopback servers
  (systemd-resolved's upstream list when the host uses its stub).
- TAP fds are opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR and close-on-exec;
  QEMU's `-netdev tap,fd=N` sees the flag and uses the virtio-net header.
  The TAPs are not persistent: they go away when QEMU's fds close.
- Port-forward (portforward.py): a listener on 127.0.0.1 in the VM's
  namespace and a nat OUTPUT REDIRECT rule there to it, recorded in the
  state file and removed by teardown.
- State: /run/spinbox/net/<id>.json (written before each step), leases under
  /run/spinbox/cni/<network>/; teardown = port-forward rule, TAPs and filters, CNI DEL, holder,
  namespace (if spinbox made it), state file.
"""

from __future__ import annotations

from spinbox.cniplugins import DEFAULT_CONFLIST
from spinbox.net.config import NetConfig
from spinbox.net.errors import NetworkError
from spinbox.net.network import (
    VmNetwork,
    collect_leftovers,
    prepare_netns,
    setup_network,
    teardown_network,
)
from spinbox.net.portforward import open_port_forward
from spinbox.net.tap import open_unconnected_taps
from spinbox.vm import Nic

__all__ = [
    "DEFAULT_CONFLIST",
    "NetConfig",
    "NetworkError",
    "Nic",
    "VmNetwork",
    "collect_leftovers",
    "open_port_forward",
    "open_unconnected_taps",
    "prepare_netns",
    "setup_network",
    "teardown_network",
]
