"""The AppArmor profile a container's process names, loaded in the guest's kernel for crun to apply.

The shim sends the compiled policy that defines the profile as the host's kernel holds it
(spinbox.shim.apparmor); vminitd loads it through the guest's AppArmor filesystem, checks that
the profile is then loaded, and leaves process.apparmorProfile for crun, which confines the
process by it from its exec on. A profile the guest cannot give fails the create or exec,
naming it: no AppArmor in the guest's kernel, a policy that kernel refuses, or a profile that
no policy defined.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from guest.vminitd import syscalls
from guest.vminitd.validate import InvalidRequest
from spinbox.ttrpc import Code, TtrpcError

log = logging.getLogger(__name__)

SECURITYFS = "/sys/kernel/security"
# Profiles that are no policy: crun runs the process unconfined.
UNCONFINED = ("", "unconfined")


def prepare(process: dict[str, Any], policy: bytes, name: str, securityfs: str = SECURITYFS) -> None:
    """Loads `policy` and checks that the profile `process` names is loaded (nothing for none)."""
    profile = process.get("apparmorProfile") or ""
    if not isinstance(profile, str):
        raise InvalidRequest(f"the apparmorProfile of {name} is not a string")
    if profile in UNCONFINED:
        if policy:
            log.warning("%s carries an AppArmor policy but names no profile; not loaded", name)
        return
    apparmor = apparmor_fs(securityfs, f"{name} asks for AppArmor profile {profile!r}")
    if policy:
        load(apparmor, policy, f"the AppArmor policy of profile {profile!r} for {name}")
    top = profile.split("//", 1)[0]
    if top not in loaded_profiles(apparmor):
        raise TtrpcError(
            Code.FAILED_PRECONDITION,
            f"{name} asks for AppArmor profile {profile!r}, which is not loaded in its VM's kernel",
        )


def apparmor_fs(securityfs: str, wanting: str) -> str:
    """The guest's AppArmor filesystem, securityfs mounted first if it is not."""
    apparmor = os.path.join(securityfs, "apparmor")
    if not os.path.isdir(apparmor):
        try:
            syscalls.mount(
                "securityfs",
                securityfs,
                "securityfs",
                syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC,
            )
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise TtrpcError(
                    Code.FAILED_PRECONDITION, f"{wanting}, but securityfs cannot be mounted: {error.strerror}"
                ) from None
    if not os.path.isfile(os.path.join(apparmor, "profiles")):
        raise TtrpcError(Code.FAILED_PRECONDITION, f"{wanting}, but the VM's kernel has no AppArmor enabled")
    return apparmor


def load(apparmor: str, policy: bytes, what: str) -> None:
    """Loads (or replaces) a compiled policy in the kernel: the kernel takes it in one write."""
    try:
        fd = os.open(os.path.join(apparmor, ".replace"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = os.write(fd, policy)
        finally:
            os.close(fd)
    except OSError as error:
        raise TtrpcError(
            Code.FAILED_PRECONDITION, f"the VM's kernel refused {what}: {error.strerror}"
        ) from None
    if written != len(policy):
        raise TtrpcError(
            Code.FAILED_PRECONDITION, f"the VM's kernel took {written} of the {len(policy)} bytes of {what}"
        )
    log.info("loaded %s (%d bytes)", what, len(policy))


def loaded_profiles(apparmor: str) -> set[str]:
    """The names of the profiles loaded in the kernel (its `profiles` file: "NAME (MODE)" lines)."""
    with open(os.path.join(apparmor, "profiles"), encoding="utf-8", errors="replace") as file:
        return {line.rsplit(" (", 1)[0] for line in file.read().splitlines() if line}
