"""A guest image whose PID 1 is a small Python package of a test's or a
benchmark's own (not vminitd), with busybox for its shell commands."""

from __future__ import annotations

from pathlib import Path

from guest.mkguest.image import BUSYBOX, ImageConfig, build
from spinbox.vm.spec import default_kernel


def build_init_image(work: Path, package: str, main: str) -> Path:
    """work/initrd.img, running `main` (the source of package.main, with a main()) as PID 1."""
    root = work / "init"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (root / package / "main.py").write_text(main)
    output = work / "initrd.img"
    config = ImageConfig(
        kernel_version=default_kernel().name.removeprefix("vmlinuz-"),
        entry=f"{package}.main:main",
        packages=(package,),
        roots=(root,),
        tools=(BUSYBOX,),
    )
    build(config, output)
    return output
