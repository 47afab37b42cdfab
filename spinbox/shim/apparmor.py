"""The AppArmor profile an OCI process names, as the host's kernel holds it, for the guest's kernel.

runc confines a process by the profile its spec names (process.apparmorProfile), loaded in the
host's kernel beforehand (by containerd's CRI for its default profile, by the operator or
`apparmor_parser` for a "localhost/" one). A spinbox container runs under the guest's kernel,
so the shim reads the compiled policy that defines the profile from the host's AppArmor
filesystem (each loaded profile's `raw_data`, the policy exactly as it was loaded) and sends it
with the container; vminitd loads it into the guest's kernel before crun applies the profile.

A profile that spinbox cannot give the container fails the create or exec, naming it: AppArmor
off on the host, the profile not loaded there, or a kernel that does not export its policy.
"""

from __future__ import annotations

import json
import os
from typing import Any

# The host's AppArmor filesystem (securityfs); its `profiles` file exists only while AppArmor is on.
APPARMOR_FS = "/sys/kernel/security/apparmor"
# A policy must fit in one agent message (ttrpc's limit is 4 MiB) beside the spec.
MAX_POLICY = 3 << 20
# Profiles that are no policy: the process runs unconfined.
UNCONFINED = ("", "unconfined")


class AppArmorError(Exception):
    pass


def profile_of(process: object) -> str:
    """The AppArmor profile an OCI process object names ("" for none)."""
    if not isinstance(process, dict):
        return ""
    profile = process.get("apparmorProfile") or ""
    if not isinstance(profile, str):
        raise AppArmorError(f"the OCI process's apparmorProfile is not a string: {profile!r}")
    return profile


def policy_for_spec(spec: dict[str, Any], root: str = APPARMOR_FS) -> bytes:
    """The policy defining the profile of the spec's process (b"" for none)."""
    return host_policy(profile_of(spec.get("process")), root)


def policy_for_process(process_json: bytes, root: str = APPARMOR_FS) -> bytes:
    """The policy defining the profile of an exec's OCI process (b"" for none)."""
    try:
        process = json.loads(process_json)
    except ValueError:
        return b""  # not ours to judge: the guest refuses a malformed process, naming it
    return host_policy(profile_of(process), root)


def host_policy(profile: str, root: str = APPARMOR_FS) -> bytes:
    """The compiled policy, as loaded in the host's kernel, that defines `profile`.

    A child profile ("parent//hat") comes with its parent's policy. b"" for no profile."""
    if profile in UNCONFINED:
        return b""
    if not os.path.exists(os.path.join(root, "profiles")):
        raise AppArmorError(
            f"the container asks for AppArmor profile {profile!r}, but AppArmor is not enabled on this host"
        )
    top = profile.split("//", 1)[0]
    loaded = os.path.join(root, "policy", "profiles")
    try:
        entries = sorted(os.listdir(loaded))
    except OSError as error:
        raise AppArmorError(
            f"cannot list the host's AppArmor profiles in {loaded}: {error.strerror}"
        ) from None
    for entry in entries:
        directory = os.path.join(loaded, entry)
        try:
            with open(os.path.join(directory, "name"), encoding="utf-8", errors="replace") as file:
                name = file.read().strip()
        except OSError:
            continue  # removed while listed
        if name == top:
            return _raw_data(profile, directory)
    raise AppArmorError(
        f"AppArmor profile {profile!r} is not loaded on this host (load it with apparmor_parser first)"
    )


def _raw_data(profile: str, directory: str) -> bytes:
    path = os.path.join(directory, "raw_data")
    try:
        with open(path, "rb") as file:
            policy = file.read(MAX_POLICY + 1)
    except FileNotFoundError:
        raise AppArmorError(
            f"the host's kernel does not export the policy of AppArmor profile {profile!r} "
            f"(no {path}: CONFIG_SECURITY_APPARMOR_EXPORT_BINARY is off), so the guest cannot load it"
        ) from None
    except OSError as error:
        raise AppArmorError(
            f"cannot read the policy of AppArmor profile {profile!r}: {error.strerror}"
        ) from None
    if len(policy) > MAX_POLICY:
        raise AppArmorError(
            f"the policy of AppArmor profile {profile!r} is larger than the {MAX_POLICY} bytes "
            "a container can carry into its VM"
        )
    if not policy:
        raise AppArmorError(f"the host's kernel gives an empty policy for AppArmor profile {profile!r}")
    return policy
