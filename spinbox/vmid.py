"""The VM id spinbox gives a container: shared by the shim, which names the
VM, and spinboxctl, which finds it again from the id the user knows."""

from __future__ import annotations

import re

try:
    # CPython's own SHA-256: hashlib would load OpenSSL, megabytes in every shim.
    from _sha256 import sha256 as _sha256  # type: ignore[import-not-found]
except ImportError:  # Python 3.12 and later name it _sha2
    from hashlib import sha256 as _sha256

# containerd's default namespace, as ctr and nerdctl use it without -n.
DEFAULT_NAMESPACE = "default"

VM_ID_MAX = 64
_VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def vm_id_for(namespace: str, group_id: str) -> str:
    """The VM of a container (or pod) id in a containerd namespace (ids only
    have to be unique within a namespace). spinboxd takes 1-64 letters,
    digits, '_', '.' and '-'; longer ids (nerdctl's are 64 hex digits) keep
    a readable prefix and a digest of the whole."""
    name = f"{namespace}-{group_id}" if namespace else group_id
    if len(name) <= VM_ID_MAX and _VM_ID.fullmatch(name):
        return name
    digest = _sha256(f"{namespace}/{group_id}".encode()).hexdigest()[:16]
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[: VM_ID_MAX - len(digest) - 1].lstrip("_.-")
    return f"{prefix}-{digest}" if prefix else digest
