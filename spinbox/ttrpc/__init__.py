"""ttrpc for asyncio: containerd's lightweight RPC protocol (framed protobuf
over any stream transport), client and server, unary and streaming calls.

Wire: a 10-byte header (length, stream id, type, flags) per frame, payloads
of at most 4 MiB; requests carry ttrpc.Request, answers ttrpc.Response with
a google.rpc.Status. Streaming follows ttrpc 1.2: a server-streaming call is
a request flagged remote-closed answered by data frames and a final data
frame flagged remote-closed|no-data (or a Response carrying an error); a
client-streaming call is a request flagged remote-open, data frames, a bare
data frame flagged remote-closed|no-data, then the Response.

Behaviour worth knowing:
- A client call's timeout is sent as the request's deadline; the server
  cancels the handler when it passes and answers DEADLINE_EXCEEDED.
- ttrpc has no cancel frame: a client call that is cancelled stops waiting
  and drops whatever still arrives for it, but the server's handler runs on
  (until its deadline). To stop an endless server stream, close the
  connection it runs on.
- A server stream buffers a bounded number of messages per call; when its
  consumer falls behind, the client stops reading the connection (every call
  on it waits) until the consumer catches up. Give a stream that may stall
  for long its own connection.
- A client-streaming handler that falls behind for more than a second fails
  with RESOURCE_EXHAUSTED rather than stalling the connection.
- A malformed frame ends its connection with a logged reason; an oversized
  but well-formed one is skipped and answered with RESOURCE_EXHAUSTED.
- Server.close() stops listening, cancels the handlers still running and
  closes every connection; Client.close() fails the calls still waiting with
  UNAVAILABLE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spinbox.ttrpc.server import CallContext, Server
from spinbox.ttrpc.status import Code, TtrpcError

if TYPE_CHECKING:
    from spinbox.ttrpc.client import Client

__all__ = ["CallContext", "Client", "Code", "Server", "TtrpcError"]


def __getattr__(name: str) -> object:
    # The client loads on first use: a process that only serves (the guest agent) never pays for it.
    if name == "Client":
        from spinbox.ttrpc.client import Client

        return Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
