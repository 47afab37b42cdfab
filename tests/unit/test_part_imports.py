"""Each part loads only its own code and the leaf modules parts share
(spinbox.agent, spinbox.mounts, spinbox.busnames, spinbox.busclient,
spinbox.host, spinbox.config): the shim no spinboxd, VM (QEMU, QMP, CID
leases) or storage (mkfs, mount) code; spinboxctl no spinboxd or VM code;
vminitd, which runs in the guest, no host code at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.imports import check_imports, forbidden_loads, loaded_after, package_modules

# The shim's modules, and those its server loads once it serves.
SHIM = [*package_modules("spinbox.shim"), "spinbox.agent", "spinbox.ttrpc"]
SHIM_FORBIDDEN = ("spinbox.daemon", "spinbox.vm", "spinbox.storage", "spinbox.net", "spinbox.cli", "qemu")

CLI = ["spinbox.cli", "spinbox.cli.__main__"]
CLI_FORBIDDEN = ("spinbox.daemon", "spinbox.vm", "spinbox.storage", "spinbox.net", "spinbox.shim", "qemu")

VMINITD = package_modules("guest.vminitd")
# What of spinbox the guest image carries: the agent API's messages and ttrpc.
VMINITD_SPINBOX = ("spinbox.api", "spinbox.ttrpc")
VMINITD_FORBIDDEN = ("dbus_fast", "pyroute2", "qemu", "guest.mkguest")


def test_the_shim_loads_no_daemon_vm_or_storage_code() -> None:
    check_imports("the shim", SHIM, SHIM_FORBIDDEN)


# What a serving shim holds for its container's whole life: what only `start`
# and `delete` need, TLS (asyncio's ssl), OpenSSL's hashes, GLib, dbus_fast
# (spinboxd's D-Bus library: the shim only calls, through spinbox.busconnection),
# and pathlib with the URL parser it imports (only a binary:// or file:// stdio
# URI needs that) are not among it; nor is protobuf's C++ backend (below).
SERVER_NEVER = (
    "spinbox.shim.bootstrap",
    "spinbox.shim.cleanup",
    "ssl",
    "_ssl",
    "hashlib",
    "_hashlib",
    "gi",
    "dbus_fast",
    "xml",
    "pathlib",
    "urllib",
    # inspect is stood for until used (spinbox.shim.__main__.SERVER_LOADS_ON_USE): these come with it.
    "ast",
    "dis",
    *SHIM_FORBIDDEN,
)
# The server, and a VM id for a CRI container's 64 hex digits (a digest of the id).
SERVER = (
    "from spinbox.shim.__main__ import server_entry\nserver_entry()\n"
    "from spinbox.vmid import vm_id_for\nvm_id_for('k8s.io', 'f' * 64)\n"
)


def server_loads(code: str = SERVER) -> set[str]:
    return loaded_after(code)


def test_the_serving_shim_loads_only_what_it_serves_with() -> None:
    loaded = server_loads()
    # The check sees the server's real import set: the Task API, ttrpc and the D-Bus client.
    assert {
        "spinbox.shim.service",
        "spinbox.ttrpc.server",
        "spinbox.busclient",
        "spinbox.busconnection",
    } <= loaded
    bad = sorted(name for name in loaded if any(name == n or name.startswith(n + ".") for n in SERVER_NEVER))
    assert not bad, f"the serving shim loads modules it never uses: {', '.join(bad)}"


def test_the_binary_reaches_its_server_without_what_it_puts_off() -> None:
    # As containerd runs it: main() parses the command line (the options are a dataclass).
    loaded = server_loads(
        "from spinbox.shim.__main__ import main, server_entry\nmain(['-v'])\nserver_entry()\n"
    )
    assert "spinbox.shim.service" in loaded
    assert not {"ast", "dis"} & loaded


def test_a_module_put_off_loads_on_first_use() -> None:
    code = (
        "from spinbox.shim.__main__ import LoadedOnUse\n"
        "stand_in = sys.modules['colorsys'] = LoadedOnUse('colorsys')\n"
        "import colorsys\n"
        "assert colorsys is stand_in and 'rgb_to_hsv' not in vars(stand_in)\n"
        "assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)\n"
        "import colorsys as real\n"
        "assert real is not stand_in and sys.modules['colorsys'] is real\n"
        "assert stand_in.hls_to_rgb is real.hls_to_rgb\n"
    )
    assert "colorsys" in server_loads(code)


def test_the_serving_shim_runs_on_protobufs_upb_backend() -> None:
    # Debian's python3-protobuf is the C++ backend: libprotobuf and libstdc++ cost every shim
    # about 4 MiB. The package bundles the upb one (packaging/vendor.txt), and tools/setup
    # installs it into the development venv; a venv set up before that needs tools/setup again.
    loaded = server_loads(
        SERVER + "from google.protobuf.internal import api_implementation as a\nprint(a.Type())\n"
    )
    assert "google._upb._message" in loaded
    assert "google.protobuf.pyext._message" not in loaded, "the C++ protobuf backend: run tools/setup"


def test_the_server_check_sees_what_a_plain_import_would_load() -> None:
    # Without server_entry's refusals, asyncio brings ssl and dbus_fast brings gi (where installed).
    loaded = server_loads("import spinbox.shim.server\n")
    assert "ssl" in loaded and "spinbox.shim.service" in loaded


def test_spinboxctl_loads_no_daemon_or_vm_code() -> None:
    check_imports("spinboxctl", CLI, CLI_FORBIDDEN)


def test_the_configuration_loads_no_vm_code() -> None:
    check_imports("spinbox.config", ["spinbox.config"], ("spinbox.vm", "spinbox.daemon", "spinbox.storage"))


def test_vminitd_loads_no_host_code() -> None:
    check_imports(
        "vminitd",
        VMINITD,
        VMINITD_FORBIDDEN,
        only=VMINITD_SPINBOX,
        within="spinbox",
    )


def test_the_parts_modules_are_all_checked() -> None:
    assert "spinbox.shim.service" in SHIM and "spinbox.shim.create" in SHIM
    assert "guest.vminitd.containers" in VMINITD and "guest.vminitd.__main__" in VMINITD


def test_the_check_fails_on_a_forbidden_import(tmp_path: Path) -> None:
    # A shim module that reaches for the VM machinery, and a guest one for spinboxd's bus names.
    (tmp_path / "shim_extra.py").write_text("import spinbox.shim.service\nimport spinbox.vm.machine\n")
    (tmp_path / "guest_extra.py").write_text("import guest.vminitd.service\nimport spinbox.busnames\n")
    bad = forbidden_loads(["shim_extra"], SHIM_FORBIDDEN, path=[tmp_path])
    assert "spinbox.vm.machine" in bad
    assert "spinbox.vm.qemu" in bad
    with pytest.raises(AssertionError, match=r"the shim loads modules it must not: .*spinbox\.vm\.machine"):
        check_imports("the shim", ["shim_extra"], SHIM_FORBIDDEN, path=[tmp_path])
    with pytest.raises(AssertionError, match=r"vminitd loads modules it must not: spinbox\.busnames$"):
        check_imports(
            "vminitd",
            ["guest_extra"],
            VMINITD_FORBIDDEN,
            only=VMINITD_SPINBOX,
            within="spinbox",
            path=[tmp_path],
        )
