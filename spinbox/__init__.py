"""spinbox: containers in lightweight QEMU virtual machines, behind containerd."""

__version__ = "0.1.0"
