"""The RuntimeClass a cluster operator applies (packaging/kubernetes/runtimeclass.yaml,
installed under /usr/share/spinbox/kubernetes/): checked against the fields of
Kubernetes' node.k8s.io/v1 RuntimeClass, since kubectl's schema is not at hand."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

TOP = Path(__file__).resolve().parents[3]
MANIFEST = TOP / "packaging" / "kubernetes" / "runtimeclass.yaml"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# resource.Quantity: a number with an optional binary or decimal suffix.
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?"  # an optional DNS subdomain prefix
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def mebibytes(quantity: str) -> float:
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    decimal = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}
    scale = {**{k: v / 2**20 for k, v in decimal.items()}, "Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(number) * scale[suffix]


def load() -> dict[str, Any]:
    documents = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert len(documents) == 1
    document = documents[0]
    assert isinstance(document, dict)
    return document


def test_the_manifest_is_a_runtimeclass_with_the_spinbox_handler() -> None:
    rc = load()
    assert set(rc) <= {"apiVersion", "kind", "metadata", "handler", "overhead", "scheduling"}
    assert rc["apiVersion"] == "node.k8s.io/v1"
    assert rc["kind"] == "RuntimeClass"
    assert set(rc["metadata"]) <= {"name", "labels", "annotations"}
    assert DNS_LABEL.match(rc["metadata"]["name"]) and rc["metadata"]["name"] == "spinbox"
    # The CRI handler name containerd's configuration gives spinbox (packaging/containerd/).
    assert rc["handler"] == "spinbox" and DNS_LABEL.match(rc["handler"])
    for toml in ("cri-v2.toml", "cri-v3.toml"):
        assert "containerd.runtimes.spinbox]" in (TOP / "packaging" / "containerd" / toml).read_text()


def test_the_overhead_is_cpu_and_memory_quantities() -> None:
    pod_fixed = load()["overhead"]["podFixed"]
    assert set(pod_fixed) == {"cpu", "memory"}
    for value in pod_fixed.values():
        assert isinstance(value, str) and QUANTITY.match(value), value
    # What each pod's VM adds: at least the guest RAM the shim adds above the containers' limits.
    from spinbox.shim.sizing import GUEST_OVERHEAD_MIB

    assert mebibytes(pod_fixed["memory"]) >= GUEST_OVERHEAD_MIB


def test_scheduling_selects_nodes_that_have_spinbox() -> None:
    scheduling = load()["scheduling"]
    assert set(scheduling) <= {"nodeSelector", "tolerations"}
    for key, value in scheduling["nodeSelector"].items():
        assert LABEL_KEY.match(key) and isinstance(value, str) and LABEL_VALUE.match(value), (key, value)


def test_the_package_installs_it() -> None:
    assert "usr/share/spinbox/kubernetes" in (TOP / "tools" / "install-tree").read_text()


def test_the_overhead_is_what_bench_density_measured() -> None:
    """The comment quotes bench/density's per-container PSS and idle CPU; podFixed is them rounded
    as bench/density rounds them (memory up to 16 MiB, CPU up to 10 millicores)."""
    text = MANIFEST.read_text()
    measured = re.search(r"PSS per\n# container ([0-9.]+) MiB .*? and ([0-9]+) millicores", text, re.S)
    assert measured, "the manifest's comment must quote bench/density's numbers"
    memory_mib, millicores = float(measured.group(1)), int(measured.group(2))
    pod_fixed = load()["overhead"]["podFixed"]
    assert pod_fixed["memory"] == f"{math.ceil(memory_mib / 16) * 16}Mi"
    assert pod_fixed["cpu"] == f"{max(10, math.ceil(millicores / 10) * 10)}m"
