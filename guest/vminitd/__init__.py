"""vminitd: PID 1 in a spinbox VM. It boots the guest, then serves the agent API."""

__version__ = "0.1.0"
