"""Shared pieces of the real-VM tests that run a backend inside an appliance.

    consumer VM (busybox initramfs, stock vhost-user front-end, RAM = a file)
      -> vvu-devd on the host (DeviceModelProcess: one VVU device per VvuLink)
      -> QEMU's vfio-user client in the appliance VM (mkosi Debian image)
      -> vvu-blk / vvu-switch --vvu ... inside it (ApplianceProcess)

The appliance is driven through its root serial console (no SSH round trips;
kernel messages are silenced there so they cannot mix into command output).
Its own backend units are masked for the run: the tests start, kill and
restart the backends themselves.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from vvu_runtime.launch.appliance import ApplianceImage, ApplianceMachine
from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import RUNTIME_PREFIX, GuestConsole, QemuMachine
from vvu_runtime.launch.process import VvuLink
from vvu_runtime.launch.procs import pid_alive
from vvu_runtime.launch.render import BlkDevice, NetDevice, render_devices
from vvu_runtime.launch.toolchain import Toolchain

#: RAM of every consumer VM; vvu-devd shows it as the VVU function's BAR2.
CONSUMER_MIB = 128
#: Prefix of the consumer RAM files these tests provision in /dev/shm.
RAM_PREFIX = "vvu-test-link-"
#: The backend units of the images (the tests run the backends themselves).
BACKEND_UNITS = ("vvu-switch.service", "vvu-blk.service")


def wait(predicate: Callable[[], bool], what: str, timeout: float = 120.0,
         every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def links(workdir: Path, *names: str) -> list[VvuLink]:
    return [VvuLink.in_dir(workdir, n, ram_prefix=RAM_PREFIX) for n in names]


# --------------------------------------------------------------------------
# The appliance
# --------------------------------------------------------------------------


@contextlib.contextmanager
def appliance(toolchain: Toolchain, image: ApplianceImage, vfio_sockets: Sequence[Path], *,
              viommu: bool = True) -> Iterator[ApplianceMachine]:
    """The appliance booted with one VVU function per socket, its backend units masked."""
    # viommu=False: the poll-mode fallback, for appliances without a vIOMMU.
    vm = ApplianceMachine(toolchain, image, viommu=viommu)
    for sock in vfio_sockets:
        vm.add_vfio_user_device(sock)
    with vm:
        c = vm.console
        c.check("dmesg -n 1")  # no kernel messages in the middle of command output
        c.check(f"systemctl mask --runtime --now {' '.join(BACKEND_UNITS)} >/dev/null 2>&1")
        yield vm


def vvu_functions(vm: ApplianceMachine) -> list[str]:
    """PCI addresses of the appliance's VVU functions, in address order."""
    out = vm.console.check("grep -l 0x107f /sys/bus/pci/devices/*/device || true")
    return sorted(Path(p).parent.name for p in out.split() if p.endswith("/device"))


def shell(vm: ApplianceMachine, timeout: float = 120.0) -> Callable[[str], str]:
    """A command runner for ApplianceProcess: the appliance's root console."""
    def run(cmd: str) -> str:
        return vm.console.check(cmd, timeout=timeout)
    return run


# --------------------------------------------------------------------------
# Consumers
# --------------------------------------------------------------------------


def blk_consumer(toolchain: Toolchain, assets: ConsumerAssets, link: VvuLink | Path, *,
                 name: str = "blk-consumer", memory_mib: int = CONSUMER_MIB) -> QemuMachine:
    """A consumer with a ``vhost-user-blk-pci`` disk on the link (or a plain socket)."""
    sock, ram = (link.vhost_socket, link.ram_file) if isinstance(link, VvuLink) else (link, None)
    return QemuMachine(
        toolchain, name=name, kernel=assets.kernel, initrd=assets.initrd,
        memory_mib=memory_mib, memory_file=ram,
        args=render_devices(BlkDevice("blk0", sock, reconnect_ms=300)))


def net_consumer(toolchain: Toolchain, assets: ConsumerAssets, link: VvuLink | Path, ip: str,
                 mac: str, *, name: str, memory_mib: int = CONSUMER_MIB) -> QemuMachine:
    """A consumer with a ``-netdev vhost-user`` + ``virtio-net-pci`` NIC on the link."""
    sock, ram = (link.vhost_socket, link.ram_file) if isinstance(link, VvuLink) else (link, None)
    return QemuMachine(
        toolchain, name=name, kernel=assets.kernel, initrd=assets.initrd,
        append=f"vvu.ip={ip}/24", memory_mib=memory_mib, memory_file=ram,
        args=render_devices(NetDevice("net0", sock, mac)))


def boot_all(stack: contextlib.ExitStack, vms: Sequence[QemuMachine]) -> None:
    """Launch every VM, then wait for each: they boot side by side."""
    for vm in vms:
        stack.callback(vm.shutdown)
        vm.launch()
    for vm in vms:
        vm.wait_for_boot()


def wait_ping(console: GuestConsole, peer: str, timeout: float = 120.0) -> None:
    """Until ``peer`` answers a ping (links come up, the switch learns)."""
    deadline = time.monotonic() + timeout
    while True:
        rc, out = console.run(f"ping -c 1 -W 2 {peer}")
        if rc == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{peer} unreachable:\n{out}")


def send_file(src: GuestConsole, dst: GuestConsole, dst_ip: str, kib: int, *,
              port: int = 5000, timeout: float = 600.0) -> tuple[str, float]:
    """``kib`` KiB of random data from ``src`` to ``dst`` with busybox nc; the sha256
    sums must match. Returns (sha256, seconds the transfer took)."""
    # The listener's stdin is a pipe that never delivers: a background busybox nc
    # reading the console would be stopped (SIGTTIN) and stop reading the socket.
    dst.check(f"rm -f /tmp/recv; (sleep 100000 | nc -l -p {port} > /tmp/recv) "
              ">/dev/null 2>&1 &")
    src.check(f"dd if=/dev/urandom of=/tmp/send bs=1024 count={kib} 2>/dev/null")
    sent = src.check("sha256sum /tmp/send").split()[0]
    time.sleep(0.5)
    start = time.monotonic()
    src.check(f"nc -w 10 {dst_ip} {port} < /tmp/send", timeout=timeout)
    deadline = time.monotonic() + timeout
    while int(dst.check("wc -c < /tmp/recv").strip() or 0) < kib * 1024:
        assert time.monotonic() < deadline, "the file did not arrive in full"
        time.sleep(0.2)
    took = time.monotonic() - start
    got = dst.check("sha256sum /tmp/recv").split()[0]
    assert got == sent, f"sent sha256 {sent}, received {got}"
    return sent, took


# --------------------------------------------------------------------------
# Leaks
# --------------------------------------------------------------------------


def processes_mentioning(*needles: str) -> list[str]:
    """Command lines of live processes that mention any of ``needles``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if any(n in cmdline for n in needles) and pid_alive(int(entry)):
            found.append(f"{entry}: {cmdline[:300]}")
    return found


def leftovers(workdir: Path, pids: Sequence[int | None]) -> list[str]:
    """What a finished rig left behind: processes, sockets, RAM and runtime files."""
    left = [f"pid {p} alive" for p in pids if pid_alive(p)]
    left += processes_mentioning(str(workdir), f"{RAM_PREFIX}{os.getpid()}-")
    left += [str(p) for p in workdir.glob("*") if p.is_socket()]
    left += [str(p) for p in Path("/dev/shm").glob(f"{RAM_PREFIX}{os.getpid()}-*")]
    left += [str(p) for p in Path("/dev/shm").glob(f"{RUNTIME_PREFIX}{os.getpid()}-*")]
    left += [str(p) for p in Path("/tmp").glob(f"{RUNTIME_PREFIX}{os.getpid()}-*")]
    return left


def records_script(count: int, first_sector: int = 0, acks: str = "/tmp/acks") -> str:
    """A guest shell loop writing record i (512 bytes of ``"%511d\\n" % i``) at
    sector ``first_sector + i`` with O_DIRECT + fsync; it appends ``ACK i`` to
    ``acks`` only once the write and its FLUSH completed (``ERR i`` if not), then
    ``DONE``."""
    return (
        f"i=0; while [ $i -lt {count} ]; do "
        "printf '%511d\\n' $i > /tmp/rec; "
        f"dd if=/tmp/rec of=/dev/vda bs=512 seek=$(({first_sector}+i)) oflag=direct conv=fsync "
        f"2>/dev/null && echo ACK $i >> {acks} || echo ERR $i >> {acks}; "
        f"i=$((i+1)); done; echo DONE >> {acks}"
    )


def record(i: int) -> bytes:
    return b"%511d\n" % i


def acked(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"ACK (\d+)", text)]
