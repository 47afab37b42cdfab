"""spinboxctl: the command line for spinbox's VMs."""
