"""critest (cri-tools' CRI validation suite) against containerd with the `spinbox`
runtime handler, in the private systemd, with stand-in images from a registry on
127.0.0.1 that containerd's registry mirrors put in place of the public ones.

`make test` runs a focused subset (basic container, pod, exec, log and stop
specs); `make conformance` (SPINBOX_CONFORMANCE=full) runs the whole suite and
keeps its JUnit report and log under build/critest/; SPINBOX_CRITEST_FOCUS=REGEX
runs the specs whose names match instead, on every containerd version."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import BUILDS, CriContainerd
from tests.e2e.standins import MIRRORED, REGISTRY, push_all
from tests.harness.fixtures import artifacts_dir
from tests.harness.systemd import PrivateSystemd
from tests.integration.daemon.spinboxd import TOP

CRITEST = Path(os.environ.get("SPINBOX_CRITEST", "/opt/spinbox-test/bin/critest"))
FULL = os.environ.get("SPINBOX_CONFORMANCE") == "full"
# A regular expression of spec names to run instead (e.g. the specs a change is about).
CHOSEN = os.environ.get("SPINBOX_CRITEST_FOCUS", "")
REPORTS = TOP / "build" / "critest"
REGISTRY_UNIT = "spinbox-e2e-registry.service"
REGISTRY_CONFIG = """version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
http:
  addr: {address}
"""
CERTS_D = "/etc/containerd/certs.d"
# The subset inside `make test` (six specs, a few minutes under TCG): a pod, a container's stop,
# removal, exec and log, and StopContainer on a stopped container.
FOCUS = (
    r"runtime should support running PodSandbox|runtime should support stopping container|"
    r"runtime should support removing stopped container|runtime should support execSync \[|"
    r"starting container with log|StopContainer should not return an error if already stopped"
)


def mirrors(build: str) -> str:
    if build == "1.6":
        return "".join(
            f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]\n'
            f'  endpoint = ["http://{REGISTRY}"]\n'
            for host in MIRRORED
        )
    return f'[plugins."io.containerd.cri.v1.images".registry]\n  config_path = "{CERTS_D}"\n'


class MirroredCri(CriContainerd):
    """containerd's CRI with the public registries critest names mirrored to the stand-in registry."""

    kind = "critest"

    def start_unit(self, config: str) -> None:
        for host in MIRRORED:
            self.systemd.write_file(
                f"{CERTS_D}/{host}/hosts.toml",
                f'server = "https://{host}"\n'
                f'[host."http://{REGISTRY}"]\n  capabilities = ["pull", "resolve"]\n',
            )
        super().start_unit(config + mirrors(self.build.name))


@contextlib.contextmanager
def registry(systemd: PrivateSystemd) -> Iterator[None]:
    # A registry of its own per session: sessions side by side in one checkout (one per
    # containerd version) must never remove each other's images.
    root = Path(tempfile.mkdtemp(prefix="critest-registry-", dir=artifacts_dir()))
    systemd.write_file("/etc/spinbox-e2e-registry.yml", REGISTRY_CONFIG.format(root=root, address=REGISTRY))
    systemd.run("systemd-run", "--unit", REGISTRY_UNIT, "/usr/bin/docker-registry", "serve",
                "/etc/spinbox-e2e-registry.yml")  # fmt: skip
    try:
        systemd.wait_for(
            "the stand-in registry to answer",
            lambda: systemd.run("curl", "-sf", f"http://{REGISTRY}/v2/", check=False).returncode == 0,
            timeout=60,
        )
        push_all(artifacts_dir() / "critest-images", systemd.run)
        yield
    finally:
        systemd.systemctl("stop", REGISTRY_UNIT, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stand_in_registry(stack: PrivateSystemd) -> Iterator[None]:
    if not CRITEST.exists():
        pytest.skip(f"{CRITEST} is not built (tools/install-test-clients)")
    with registry(stack):
        yield


def counts(report: Path) -> dict[str, int]:
    """passed, failed and skipped specs of a Ginkgo JUnit report."""
    result = {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.get("name", "").startswith(("[BeforeSuite]", "[AfterSuite]", "[SynchronizedBeforeSuite]")):
            continue
        if case.find("skipped") is not None:
            result["skipped"] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            result["failed"] += 1
        else:
            result["passed"] += 1
    return result


def run_critest(systemd: PrivateSystemd, cri: CriContainerd, name: str, focus: str, timeout: float) -> Path:
    REPORTS.mkdir(parents=True, exist_ok=True)
    report = REPORTS / f"{name}.xml"
    argv = [
        str(CRITEST), f"-runtime-endpoint=unix://{cri.address}", f"-image-endpoint=unix://{cri.address}",
        "-runtime-handler=spinbox", f"-ginkgo.timeout={int(timeout)}s", f"-ginkgo.junit-report={report}",
        "-ginkgo.no-color",
    ]  # fmt: skip
    if focus:
        argv.append(f"-ginkgo.focus={focus}")
    with open(REPORTS / f"{name}.log", "w") as log:
        subprocess.run(systemd.nsenter(*argv), stdout=log, stderr=subprocess.STDOUT, timeout=timeout + 120)
    return report


@pytest.mark.timeout(4 * 3600)
@pytest.mark.parametrize("build", sorted(BUILDS), ids=lambda name: f"containerd-{name}")
def test_critest(build: str, stand_in_registry: None, stack: PrivateSystemd) -> None:
    if not BUILDS[build].available:
        pytest.skip(f"containerd {build} is not installed")
    if not FULL and not CHOSEN and build != "2.x":
        pytest.skip("the focused subset runs on containerd 2.x; `make conformance` runs every version")
    name = f"{'chosen' if CHOSEN else 'full' if FULL else 'focused'}-{build}"
    focus = CHOSEN or ("" if FULL else FOCUS)
    with MirroredCri.running(stack, BUILDS[build]) as cri:
        report = run_critest(stack, cri, name, focus, 3 * 3600 if FULL or CHOSEN else 900)
    found = counts(report)
    print(f"critest {name}: {found}")
    failures = [
        case.get("name", "")
        for case in ET.parse(report).getroot().iter("testcase")
        if case.find("failure") is not None
    ]
    if not FULL and not CHOSEN:
        assert found["failed"] == 0 and found["passed"] > 0, (found, failures)
    else:  # the whole suite records its counts and failures for the README's table
        (REPORTS / f"{name}.counts").write_text(f"{found}\n" + "\n".join(failures) + "\n")
