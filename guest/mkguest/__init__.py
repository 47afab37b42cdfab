"""spinbox-mkguest: the guest image (an initramfs) assembled from the host's Debian packages."""
