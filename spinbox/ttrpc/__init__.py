"""ttrpc for asyncio: containerd's lightweight RPC protocol (framed protobuf
over any stream transport), client and server, unary and streaming calls."""

from __future__ import annotations

from spinbox.ttrpc.client import Client
from spinbox.ttrpc.server import CallContext, Server
from spinbox.ttrpc.status import Code, TtrpcError

__all__ = ["CallContext", "Client", "Code", "Server", "TtrpcError"]
