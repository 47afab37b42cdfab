"""spinbox's guest side: vminitd (PID 1 in the VM) and the guest image builder."""
