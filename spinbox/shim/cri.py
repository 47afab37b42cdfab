"""The annotations containerd's CRI puts on the containers of a Kubernetes pod."""

from __future__ import annotations

# The pod a container belongs to (its sandbox's container id).
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
# "sandbox" for a pod's sandbox (pause) container, "container" for the others.
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
