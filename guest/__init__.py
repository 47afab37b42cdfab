"""The guest side of spinbox: vminitd (PID 1 in the VM) and the image builder."""
