"""kernel/spinbox.config: well formed, and naming only symbols the kernel source defines.

Building the kernel is too slow for the test suite (kernel/build does it); the
symbol check runs when kernel/build has already unpacked the source tree.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

TOP = Path(__file__).resolve().parents[3]
TREE = TOP / "build" / "kernel" / "linux-source-6.1"


def load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("spinbox_kernel_build", TOP / "kernel" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


build = load_build()


@pytest.fixture(scope="module")
def fragment() -> dict[str, str | None]:
    return build.read_config(build.FRAGMENT)  # type: ignore[no-any-return]


def test_fragment_parses_and_builds_everything_in(fragment: dict[str, str | None]) -> None:
    assert fragment["MODULES"] is None
    assert fragment["TUN"] is None
    tristate_values = {value for value in fragment.values() if value is not None and len(value) == 1}
    assert "m" not in tristate_values
    for needed in ("PVH", "VIRTIO_PCI", "VIRTIO_BLK", "VIRTIO_NET", "VIRTIO_CONSOLE", "HW_RANDOM_VIRTIO",
                   "VIRTIO_VSOCKETS", "EROFS_FS", "OVERLAY_FS", "EXT4_FS", "DEVTMPFS", "CGROUP_PIDS",
                   "MEMCG", "USER_NS", "SECCOMP_FILTER", "SERIAL_8250_CONSOLE", "ACPI"):  # fmt: skip
        assert fragment[needed] == "y", needed


def test_every_module_the_guest_image_needs_is_built_in(fragment: dict[str, str | None]) -> None:
    from guest.mkguest.kmod import BUILTIN_SYMBOLS

    for module, symbol in BUILTIN_SYMBOLS.items():
        assert fragment[symbol.removeprefix("CONFIG_")] == "y", module


def test_config_parser_names_bad_lines() -> None:
    assert build.parse_config('CONFIG_A=y\n# CONFIG_B is not set\n# note\n\nCONFIG_C="x y"\n') == {
        "A": "y",
        "B": None,
        "C": '"x y"',
    }
    with pytest.raises(build.BuildError, match=r"frag:2: not a kernel config line: 'CONFIG_A y'"):
        build.parse_config("# ok\nCONFIG_A y\n", "frag")
    with pytest.raises(build.BuildError, match="frag:2: CONFIG_A is set twice"):
        build.parse_config("CONFIG_A=y\n# CONFIG_A is not set\n", "frag")


def test_lost_settings_are_named() -> None:
    wanted = {"A": "y", "B": None, "C": "64"}
    assert build.lost_settings(wanted, {"A": "y", "C": "64"}) == []
    assert build.lost_settings(wanted, {"B": "y", "C": "8"}) == [
        "CONFIG_A: wanted y, got not set",
        "CONFIG_B: wanted not set, got y",
        "CONFIG_C: wanted 64, got 8",
    ]


@pytest.mark.skipif(not (TREE / "Kconfig").is_file(), reason=f"{TREE} is not unpacked (kernel/build does it)")
def test_every_symbol_exists_in_the_kernel_source(fragment: dict[str, str | None]) -> None:
    symbols = build.kconfig_symbols(TREE)
    assert "VIRTIO_BLK" in symbols
    assert sorted(set(fragment) - symbols) == []


def test_missing_source_and_unknown_symbols_are_named(tmp_path: Path) -> None:
    with pytest.raises(build.BuildError, match=r"nope.tar.xz does not exist: apt install linux-source-6.1"):
        build.unpack(tmp_path / "nope.tar.xz", tmp_path / "work")
    tree = tmp_path / "linux"
    (tree / "fs").mkdir(parents=True)
    (tree / "Kconfig").write_text('config EXT4_FS\n\ttristate "ext4"\nmenuconfig NET\n\tbool "net"\n')
    (tree / "fs" / "Kconfig.binfmt").write_text("config BINFMT_ELF\n\tbool\n")
    assert build.kconfig_symbols(tree) == {"EXT4_FS", "NET", "BINFMT_ELF"}
    fragment = tmp_path / "fragment.config"
    fragment.write_text("CONFIG_EXT4_FS=y\n# CONFIG_NOSUCH is not set\nCONFIG_ALSO_MISSING=y\n")
    with pytest.raises(build.BuildError, match=r"does not define: CONFIG_ALSO_MISSING, CONFIG_NOSUCH$"):
        build.configure(tree, tmp_path / "obj", fragment)
    assert not (tmp_path / "obj").exists()
