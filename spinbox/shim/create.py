"""Create, after the Task API has validated the request: a container in a
VM of its own, or a pod's further container in its sandbox's VM. Every
failure gives back what the attempt took (VM, rootfs, stdio, agent
connection) and becomes a named shim error."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from spinbox.busclient import SpinboxdError
from spinbox.mounts import MountSpec
from spinbox.shim import exits, pump, released
from spinbox.shim.container import Agent, Container, ProcessState, Publisher, VmManager
from spinbox.shim.cri import CONTAINER_TYPE_ANNOTATION
from spinbox.shim.errors import invalid, precondition, spinboxd_error
from spinbox.shim.guestspec import for_guest
from spinbox.shim.guestwatch import GuestWatch
from spinbox.shim.hooks import HookError, HostHooks, run_hooks, state_json
from spinbox.shim.portforward import PortForwarder, PortForwardError
from spinbox.shim.process import Process
from spinbox.shim.protos import task
from spinbox.shim.sizing import VmSizing
from spinbox.shim.spinboxd import VmInfo, VmRequest, vm_id_for
from spinbox.shim.stdio import StdioConfig, StdioError
from spinbox.shim.volumes import Volumes

log = logging.getLogger(__name__)

# A pod's VM takes its further containers' disks on spare PCIe ports, up to
# 5 disks per container (4 read-only layer disks and the writable one).
POD_HOTPLUG_PORTS = 16


def load_spec(bundle: str) -> dict[str, Any]:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as config:
            spec = json.loads(config.read())
    except OSError as error:
        raise invalid(f"cannot read the OCI spec {path}: {error.strerror}") from None
    except ValueError as error:
        raise invalid(f"the OCI spec {path} is not valid JSON: {error}") from None
    if not isinstance(spec, dict):
        raise invalid(f"the OCI spec {path} is not a JSON object")
    return spec


def create_error(error: BaseException, doing: str) -> BaseException:
    """What a failed Create raises: spinboxd's, hooks' and stdio's errors as named shim errors."""
    if isinstance(error, SpinboxdError):
        return spinboxd_error(error, doing)
    if isinstance(error, (HookError, PortForwardError)):
        return precondition(str(error))
    if isinstance(error, StdioError):
        return invalid(str(error))
    return error


def wants_new_netns(spec: dict[str, Any]) -> bool:
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            return not ns.get("path")
    return False


def netns_path(spec: dict[str, Any]) -> str:
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network" and ns.get("path"):
            return str(ns["path"])
    return ""


def rootfs_mounts(req: task.CreateTaskRequest) -> tuple[MountSpec, ...]:
    return tuple(MountSpec(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs)


def init_state(req: task.CreateTaskRequest) -> ProcessState:
    """The container's init process as containerd asked for it."""
    return ProcessState(
        Process(req.id, "", terminal=req.terminal, stdin=req.stdin, stdout=req.stdout, stderr=req.stderr)
    )


async def create_runtime_hooks(
    hooks: HostHooks, spec: dict[str, Any], req: task.CreateTaskRequest, pid: int
) -> None:
    """createRuntime hooks, with `pid` as the state's process (one in the container's network namespace)."""
    state = state_json(spec, req.id, "creating", pid, req.bundle)
    await run_hooks("createRuntime", hooks.create_runtime, state, fatal=True)


@dataclass(frozen=True)
class CreatePlan:
    """A validated CreateTaskRequest and what the Task API read from its bundle."""

    req: task.CreateTaskRequest
    spec: dict[str, Any]
    guest_spec: dict[str, Any]  # the spec without the hooks that run on the host
    volumes: Volumes
    sizing: VmSizing
    hooks: HostHooks
    stdio: StdioConfig
    annotations: dict[str, str]
    apparmor_policy: bytes = b""  # defines the profile the spec's process names

    def container(
        self, vm_id: str, vm: VmInfo, agent: Agent, init: ProcessState, hook_pid: int, sandbox: str = ""
    ) -> Container:
        """The created container, in the VM `vm_id` (its own, or its pod's `sandbox`)."""
        return Container(
            id=self.req.id,
            bundle=self.req.bundle,
            spec=self.spec,
            hooks=self.hooks,
            vm_id=vm_id,
            vm=vm,
            agent=agent,
            init=init,
            rootfs=list(self.req.rootfs),
            hook_pid=hook_pid,
            sandbox=sandbox,
        )


class ContainerCreator:
    """Builds a Container for a validated CreateTaskRequest."""

    def __init__(
        self,
        namespace: str,
        spinboxd: Callable[[], Awaitable[VmManager]],
        connect_agent: Callable[[str], Awaitable[Agent]],
        publisher: Publisher,
    ) -> None:
        self.namespace = namespace
        self.spinboxd = spinboxd
        self.connect_agent = connect_agent
        self.publisher = publisher

    async def vm_ending(self, vm_id: str) -> tuple[int, str, str]:
        return await (await self.spinboxd()).vm_ending(vm_id, exits.VM_ENDING_WAIT)

    async def in_new_vm(self, plan: CreatePlan) -> Container:
        """A container in a VM of its own (a pod's sandbox is one)."""
        req, spec, hooks, sizing = plan.req, plan.spec, plan.hooks, plan.sizing
        spinboxd = await self.spinboxd()
        vm_id = vm_id_for(self.namespace, req.id)
        netns = netns_path(spec)
        hook_pid = 0
        requested = False
        vm: VmInfo | None = None
        agent: Agent | None = None
        forwarder: PortForwarder | None = None
        state = init_state(req)
        try:
            # A record of an earlier container in this bundle must not speak for this one's VM.
            released.clear(req.bundle)
            if hooks and wants_new_netns(spec):
                # Hooks such as nerdctl's configure the network through
                # /proc/<pid>/ns/net before the container exists.
                netns, hook_pid = await spinboxd.prepare_network_namespace(vm_id)
            await create_runtime_hooks(hooks, spec, req, hook_pid)
            pod_sandbox = plan.annotations.get(CONTAINER_TYPE_ANNOTATION) == "sandbox"
            request = VmRequest(
                vm_id=vm_id,
                container_id=req.id,
                namespace=self.namespace,
                rootfs=rootfs_mounts(req),
                vcpus=sizing.vcpus,
                memory_mib=sizing.memory_mib,
                kernel_args=sizing.kernel_args,
                netns=netns,
                annotations=tuple(sorted(plan.annotations.items())),
                hotplug_ports=POD_HOTPLUG_PORTS if pod_sandbox else 0,
                # A pod's VM gets a share for its further containers' volumes.
                share=pod_sandbox or bool(plan.volumes.volumes),
                volumes=plan.volumes.volumes,
            )
            # From here spinboxd may hold a VM for this id even if this call
            # fails or is cancelled: the abandon below asks for it by id.
            requested = True
            vm = await spinboxd.create_vm(request)
            hook_pid = hook_pid or vm.pid
            agent = await self.connect_agent(vm.agent_address)
            agent.on_deadline = GuestWatch(self.spinboxd, vm_id, vm.path)
            await self._create_in_guest(agent, plan, state, vm.pid, hook_pid)
            if pod_sandbox and netns:
                forwarder = await self._port_forwarder(spinboxd, vm.path, netns, agent, req.id)
        except BaseException as error:
            # A VM of this id that was there before this request is not ours to remove.
            ours = requested and not (isinstance(error, SpinboxdError) and error.kind == "AlreadyExists")
            await self._abandon(vm_id, ours or bool(netns and hook_pid), agent, state)
            raise create_error(error, f"cannot create the VM for {req.id!r}") from None
        container = plan.container(vm_id, vm, agent, state, hook_pid)
        container.forwarder = forwarder
        container.vm_ending = functools.partial(self.vm_ending, vm_id)
        container.oom_watcher = asyncio.get_running_loop().create_task(
            exits.watch_oom(container, self.publisher)
        )
        return container

    async def in_pod(self, plan: CreatePlan, pod: Container) -> Container:
        """A further container of a pod: its rootfs is added to the sandbox's running VM."""
        req, volumes = plan.req, plan.volumes
        spinboxd = await self.spinboxd()
        state = init_state(req)
        added = False
        try:
            await create_runtime_hooks(plan.hooks, plan.spec, req, pod.vm.pid)
            await spinboxd.add_rootfs(pod.vm.path, req.id, rootfs_mounts(req))
            added = True  # removing the rootfs also removes the volumes
            if volumes.volumes:
                await spinboxd.add_volumes(pod.vm.path, req.id, volumes.volumes)
            await self._create_in_guest(pod.agent, plan, state, pod.vm.pid, pod.vm.pid)
        except BaseException as error:
            await pump.stop(state)
            if added:
                try:
                    await pod.agent.delete_container(req.id)
                except Exception as e:  # the create's own error is raised below
                    log.warning("pod VM %s could not delete the half-made %s: %s", pod.vm_id, req.id, e)
                try:
                    await spinboxd.remove_rootfs(pod.vm.path, req.id)
                except Exception as undo_error:
                    log.error(
                        "could not remove the rootfs of %s after a failed create: %s", req.id, undo_error
                    )
            raise create_error(error, f"cannot add {req.id!r} to the VM of pod {pod.id!r}") from None
        container = plan.container(pod.vm_id, pod.vm, pod.agent, state, pod.vm.pid, pod.id)
        container.vm_ending = functools.partial(self.vm_ending, pod.vm_id)
        return container

    async def _create_in_guest(
        self, agent: Agent, plan: CreatePlan, state: ProcessState, vm_pid: int, hook_pid: int
    ) -> None:
        """The container in the guest (its rootfs mounted there), its output copied, prestart hooks run."""
        req = plan.req
        io_config = await pump.open_stdio(state, plan.stdio, req.id, self.namespace)
        spec_for_guest = for_guest(plan.guest_spec)
        await agent.create_container(
            req.id, json.dumps(spec_for_guest).encode(), io_config, plan.volumes.shared, plan.apparmor_policy
        )
        state.process.pid = vm_pid
        pump.start_output(agent, state)
        created = state_json(plan.spec, req.id, "created", hook_pid, req.bundle)
        await run_hooks("prestart", plan.hooks.prestart, created, fatal=True)

    @staticmethod
    async def _port_forwarder(
        spinboxd: VmManager, vm_path: str, netns: str, agent: Agent, pod: str
    ) -> PortForwarder | None:
        """The pod's localhost on the host reaching the VM's (CRI port-forward); none for a VM
        that spinboxd gave no network (network.enabled off), which is logged."""
        try:
            listener = await spinboxd.open_port_forward(vm_path)
        except SpinboxdError as error:
            if error.kind != "NoNetwork":
                raise
            log.warning("pod %s: no port-forward: %s", pod, error)
            return None
        return await PortForwarder.start(listener, netns, agent, pod)

    async def _abandon(self, vm_id: str, has_vm: bool, agent: Agent | None, state: ProcessState) -> None:
        """Gives back what a failed Create took."""
        await pump.stop(state)
        if agent is not None:
            with contextlib.suppress(Exception):
                await agent.close()
        if has_vm:
            try:
                await (await self.spinboxd()).stop_vm(vm_id, 0, kill=True)
            except Exception as error:
                log.error("could not remove VM %s after a failed create: %s", vm_id, error)
