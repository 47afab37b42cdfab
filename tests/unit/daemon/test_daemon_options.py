"""CreateVM's options: typed, checked, and errors that name the option."""

from __future__ import annotations

import pytest
from dbus_fast import Variant

from spinbox.config import VmConfig
from spinbox.daemon.errors import InvalidArgument
from spinbox.daemon.options import escape_path_element, parse_request

DEFAULTS = VmConfig()


def test_defaults_fill_what_is_not_given() -> None:
    request = parse_request("web-1", {}, DEFAULTS)
    assert (request.vcpus, request.memory_mib) == (DEFAULTS.vcpus, DEFAULTS.memory_mib)
    assert request.container_id == "web-1"
    assert request.rootfs == ()
    assert request.netns is None


def test_every_option_is_read() -> None:
    request = parse_request(
        "web-1",
        {
            "vcpus": Variant("u", 2),
            "memory-mib": Variant("t", 256),
            "rootfs": Variant("a(sssas)", [["overlay", "overlay", "", ["lowerdir=/a:/b", "upperdir=/u"]]]),
            "container-id": Variant("s", "c1"),
            "netns": Variant("s", "/proc/self/ns/net"),
            "kernel-args": Variant("as", ["quiet"]),
            "annotations": Variant("a{ss}", {"b": "2", "a": "1"}),
        },
        DEFAULTS,
    )
    assert request.vcpus == 2
    assert request.memory_mib == 256
    assert request.rootfs[0].options == ("lowerdir=/a:/b", "upperdir=/u")
    assert request.container_id == "c1"
    assert request.netns == "/proc/self/ns/net"
    assert request.annotations == (("a", "1"), ("b", "2"))


@pytest.mark.parametrize(
    ("vm_id", "options", "named"),
    [
        ("x", {"vcpus": Variant("s", "2")}, "'vcpus'"),
        ("x", {"vcpus": Variant("u", 0)}, "'vcpus'"),
        ("x", {"vcpus": Variant("u", 999)}, "'vcpus'"),
        ("x", {"memory-mib": Variant("t", 1)}, "'memory-mib'"),
        ("x", {"memory-mib": Variant("u", 512)}, "'memory-mib'"),
        ("x", {"cpus": Variant("u", 1)}, "'cpus'"),
        ("x", {"netns": Variant("s", "relative")}, "'netns'"),
        ("x", {"netns": Variant("s", "/nonexistent/netns")}, "'netns'"),
        ("x", {"kernel-args": Variant("as", ["init=/bin/sh"])}, "'kernel-args'"),
        ("x", {"kernel-args": Variant("as", ["a b"])}, "'kernel-args'"),
        ("x", {"rootfs": Variant("a(sssas)", [["", "src", "", []]])}, "'rootfs'"),
        ("x", {"container-id": Variant("s", "../etc")}, "'container-id'"),
        ("../x", {}, "VM id"),
        ("", {}, "VM id"),
        ("a" * 200, {}, "VM id"),
    ],
)
def test_malformed_options_name_the_option(vm_id: str, options: dict[str, Variant], named: str) -> None:
    with pytest.raises(InvalidArgument, match=named) as info:
        parse_request(vm_id, options, DEFAULTS)
    assert info.value.type == "org.spinstack.Spinbox.Error.InvalidArgument"


def test_object_path_escaping_matches_systemd() -> None:
    assert escape_path_element("abc") == "abc"
    assert escape_path_element("web-1") == "web_2d1"
    assert escape_path_element("1abc") == "_31abc"
    assert escape_path_element("a.b_c") == "a_2eb_5fc"
    assert escape_path_element("") == "_"
