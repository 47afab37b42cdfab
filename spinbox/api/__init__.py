"""Protocol messages: spinbox's guest agent API and the containerd APIs the
shim speaks. The Python modules are generated from proto/ by `make proto`."""
