"""spinbox-mkguest with a kernel built without modules (kernel/build's): no /lib/modules needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest.mkguest.__main__ import main as mkguest_main
from guest.mkguest.kmod import BUILTIN_SYMBOLS, REQUIRED_MODULES, module_free
from tests.unit.vm.test_mkguest import read_newc


def module_free_kernel(directory: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """A stand-in vmlinuz-spinbox with the config-spinbox kernel/build installs beside it."""
    kernel = directory / "vmlinuz-spinbox"
    kernel.write_bytes(b"not booted by these tests")
    lines = ["CONFIG_64BIT=y", "# CONFIG_MODULES is not set"]
    lines += [f"{symbol}=y" for symbol in BUILTIN_SYMBOLS.values() if symbol not in leave_out]
    (directory / "config-spinbox").write_text("\n".join(lines) + "\n")
    return kernel


def test_every_required_module_has_its_builtin_symbol() -> None:
    assert set(BUILTIN_SYMBOLS) == set(REQUIRED_MODULES)


def test_image_for_a_module_free_kernel_has_no_modules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = module_free_kernel(tmp_path)
    output = tmp_path / "initrd.img"
    assert mkguest_main(["--kernel", str(kernel), "--output", str(output)]) == 0
    assert "kernel modules: 0 (built without modules)" in capsys.readouterr().out
    entries = read_newc(output.read_bytes())
    assert entries["etc/spinbox/modules"][1] == b""
    assert not [path for path in entries if "/modules/" in path]
    assert "init" in entries


def test_module_free_kernel_lacking_a_driver_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = module_free_kernel(tmp_path, leave_out=("CONFIG_EROFS_FS", "CONFIG_VIRTIO_BLK"))
    output = tmp_path / "initrd.img"
    assert mkguest_main(["--kernel", str(kernel), "--output", str(output)]) == 1
    error = capsys.readouterr().err
    assert "has no module support and does not build in virtio_blk, erofs" in error
    assert str(tmp_path / "config-spinbox") in error
    assert not output.exists()


def test_kernel_with_modules_still_needs_its_module_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = tmp_path / "vmlinuz-6.1.0-99-cloud-amd64"
    kernel.write_bytes(b"x")
    (tmp_path / "config-6.1.0-99-cloud-amd64").write_text("CONFIG_MODULES=y\n")
    assert not module_free(kernel)
    assert mkguest_main(["--kernel", str(kernel), "--output", str(tmp_path / "x.img")]) == 1
    assert "/lib/modules/6.1.0-99-cloud-amd64 do not exist" in capsys.readouterr().err


def test_kernel_without_a_config_beside_it_is_not_module_free(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz-spinbox"
    kernel.write_bytes(b"x")
    assert not module_free(kernel)
    assert not module_free(tmp_path / "bzImage")


def test_default_kernel_is_the_configured_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kernel = module_free_kernel(tmp_path)
    config = tmp_path / "spinbox.toml"
    config.write_text(f'[vm]\nkernel = "{kernel}"\n')
    output = tmp_path / "initrd.img"
    assert mkguest_main(["--config", str(config), "--output", str(output)]) == 0
    assert f"kernel: {kernel} (spinbox)" in capsys.readouterr().out
    assert read_newc(output.read_bytes())["etc/spinbox/modules"][1] == b""


def test_bad_configuration_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "spinbox.toml"
    config.write_text("[vm]\nkernel = 7\n")
    assert mkguest_main(["--config", str(config), "--output", str(tmp_path / "x.img")]) == 1
    error = capsys.readouterr().err
    assert str(config) in error and "kernel" in error
    assert not (tmp_path / "x.img").exists()
