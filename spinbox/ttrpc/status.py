"""Status codes and the error that carries them across a ttrpc connection.

The codes are google.rpc's (the same numbers gRPC uses); a response carries
them in a google.rpc.Status.
"""

from __future__ import annotations

import enum

from spinbox.api.proto import rpc_status_pb2


class Code(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """A call failed with a status code and a sentence saying why.

    Raised by handlers to answer with a named failure, and by the client when
    the peer answers with one (or the call cannot complete).
    """

    def __init__(self, code: Code | int, message: str = "") -> None:
        try:
            code = Code(code)
        except ValueError:
            message = f"{message} (status code {code})"
            code = Code.UNKNOWN
        super().__init__(code, message)
        self.code: Code = code
        self.message: str = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def to_status(self) -> rpc_status_pb2.Status:
        return rpc_status_pb2.Status(code=self.code, message=self.message)

    @classmethod
    def from_status(cls, status: rpc_status_pb2.Status) -> TtrpcError:
        return cls(status.code, status.message)
