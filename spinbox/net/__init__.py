"""Networking for spinbox VMs: CNI, TAP devices and tc redirection.

spinboxd's interface:

    network = await setup_network(vm_id, netns, config)   # netns None: spinbox's own CNI network
    network.nics (TAP fds + MACs for QEMU), network.guest (agent NetworkConfig), network.close()
    await teardown_network(vm_id, config)                  # idempotent, from /run/spinbox/net/<id>.json
    await collect_leftovers(live_vm_ids, config)           # at start-up
    path, pid = await prepare_netns(vm_id, config)         # PrepareNetworkNamespace
"""

from __future__ import annotations

from spinbox.net.config import DEFAULT_CONFLIST, NetConfig
from spinbox.net.errors import NetworkError
from spinbox.net.network import (
    Nic,
    VmNetwork,
    collect_leftovers,
    prepare_netns,
    setup_network,
    teardown_network,
)

__all__ = [
    "DEFAULT_CONFLIST",
    "NetConfig",
    "NetworkError",
    "Nic",
    "VmNetwork",
    "collect_leftovers",
    "prepare_netns",
    "setup_network",
    "teardown_network",
]
