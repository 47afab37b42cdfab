"""containerd-shim-spinbox-v1: the containerd shim v2 that runs each task in a VM.

`__main__` is the binary (start, delete, serve); `bootstrap` its lean start-up
path; `service` the Task API; `process` the state of one process; `stdio` the
plumbing between containerd's stdio URIs and the guest agent; `events` the
ordered stream of task events to containerd.
"""
