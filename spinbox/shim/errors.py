"""Named failures of the Task API. `code` is a spinbox.ttrpc.Code member name;
the server turns each into a ttrpc status carrying the sentence."""

from __future__ import annotations

from spinbox.busclient import SpinboxdError


class ShimError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def not_found(message: str) -> ShimError:
    return ShimError("NOT_FOUND", message)


def invalid(message: str) -> ShimError:
    return ShimError("INVALID_ARGUMENT", message)


def precondition(message: str) -> ShimError:
    return ShimError("FAILED_PRECONDITION", message)


def already_exists(message: str) -> ShimError:
    return ShimError("ALREADY_EXISTS", message)


def unimplemented(message: str) -> ShimError:
    return ShimError("UNIMPLEMENTED", message)


# spinboxd's D-Bus error kinds, as ttrpc codes.
SPINBOXD_CODES = {
    "NotFound": "NOT_FOUND",
    "InvalidArgument": "INVALID_ARGUMENT",
    "AlreadyExists": "ALREADY_EXISTS",
    "Unavailable": "UNAVAILABLE",
    "org.freedesktop.DBus.Error.ServiceUnknown": "UNAVAILABLE",
    "org.freedesktop.DBus.Error.NoReply": "UNAVAILABLE",
    "org.freedesktop.DBus.Error.AccessDenied": "PERMISSION_DENIED",
}


def spinboxd_error(error: SpinboxdError, doing: str) -> ShimError:
    """spinboxd's D-Bus error as a shim error, its sentence after what the shim was doing."""
    code = SPINBOXD_CODES.get(error.kind) or SPINBOXD_CODES.get(error.name) or "UNKNOWN"
    return ShimError(code, f"{doing}: {error.message}")
