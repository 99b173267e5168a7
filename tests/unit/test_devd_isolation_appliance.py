"""One tenant cannot stop ``vvu-devd``: attacks from the appliance (vfio-user) side.

Each test runs a real ``vvu-devd`` process serving two devices, attacks device
``net0`` through its vfio-user socket (or its RAM file), then proves that the
other device, ``blk0``, still answers a vfio-user round trip, that devd's CPU
stayed low meanwhile (user + system time from /proc over about a second), and,
where the attack used to block devd, that SIGTERM still ends it with status 0.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import socket
import struct
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.devd import DevdProcess
from tests.support.guest_ram import sealed_memfd
from tests.support.proc_cpu import cpu_share
from tests.support.vfio_user_client import VfioUserClient
from vvu_runtime.device.dma import MAX_DMA_FILES
from vvu_runtime.device.errors import RemoteError
from vvu_runtime.device.vfio_user.protocol import (
    HEADER_SIZE,
    MAX_MSG_FDS,
    Command,
    DeviceInfo,
    DmaMapFlags,
    Header,
    IrqSet,
    IrqSetFlags,
    MsgFlags,
    PciIrq,
    RegionAccess,
)
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.pci_layout import Common, DeviceStatus

MiB = 1 << 20
PAGE = 4096
#: BAR0 offsets of the VVU function (docs/vvu-abi.md "BAR layout").
DEVICE_CONFIG = 0x2000
NOTIFY = 0x3000
#: Most of one core devd may use while under attack.
CPU_LIMIT = 0.5


class TwoDevices(DevdProcess):
    """``vvu-devd`` serving ``net0`` (attacked) and ``blk0`` (checked), RAM files in ``tmp``."""

    def __init__(self, tmp: Path, net0_ram: int = 8 * MiB) -> None:
        devices = []
        for name, size in (("net0", net0_ram), ("blk0", 8 * MiB)):
            ram = tmp / f"{name}.ram"
            with ram.open("wb") as f:
                f.truncate(size)
            devices.append((name, tmp / f"{name}.vhost", tmp / f"{name}.vfio", ram))
        super().__init__(devices, tmp / "devd.log", "--max-queues", "8")

    def ram(self, name: str) -> Path:
        return self.devices[name][2]

    def vfio(self, name: str) -> Path:
        return self.devices[name][1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


@pytest.fixture
def devd(tmp_path: Path) -> Iterator[TwoDevices]:
    d = TwoDevices(tmp_path)
    try:
        yield d
    finally:
        d.stop()


def assert_serves(client: VfioUserClient) -> None:
    """A vfio-user round trip on a device that must be untouched: identity and config."""
    assert client.config_read(0, 2) == 0x1AF4
    status, max_queues = struct.unpack("<II", client.region_read(0, DEVICE_CONFIG, 8))
    assert (status, max_queues) == (0, 8)


def assert_other_device_unharmed(devd: TwoDevices, other: VfioUserClient) -> None:
    assert_serves(other)
    share = cpu_share(devd.pid)
    assert share < CPU_LIMIT, f"vvu-devd used {share:.0%} of a core after the attack"
    assert_serves(other)
    assert devd.proc.poll() is None


def wait_read_by_peer(sock: socket.socket) -> None:
    """Until the peer has read everything we sent (SIOCOUTQ is 0)."""
    deadline = time.monotonic() + 10
    while struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]:
        assert time.monotonic() < deadline, "vvu-devd stopped reading the socket"
        time.sleep(0.01)


# --------------------------------------------------------------------- blocking fds


def test_a_saturated_blocking_msix_eventfd_never_blocks_devd(devd: TwoDevices) -> None:
    with devd.client("net0") as a, devd.client("blk0") as b:
        efd = os.eventfd(0)  # blocking: a write to a full counter would wait forever
        try:
            os.eventfd_write(efd, 0xFFFF_FFFF_FFFF_FFFE)
            a.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER,
                       0, 1, [efd])
            # Raise vector 0 from the client side: devd writes the eventfd now.
            a.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 1)
            assert_serves(a)
            assert_other_device_unharmed(devd, b)
            assert os.eventfd_read(efd) == 0xFFFF_FFFF_FFFF_FFFE  # nothing was added
        finally:
            os.close(efd)
    assert devd.stop() == 0


# ------------------------------------------------------------------ shrinking files


def test_a_truncated_ram_file_then_trapped_bar2_accesses(devd: TwoDevices) -> None:
    ram = devd.ram("net0")
    with ram.open("r+b") as f:
        f.write(b"vvu!")
    with devd.client("net0") as a, devd.client("blk0") as b:
        assert a.region_read(2, 0, 4) == b"vvu!"
        os.truncate(ram, PAGE)  # the consumer shrinks its RAM file under devd
        assert a.region_read(2, 5 * MiB, 8) == bytes(8)  # gone: reads as zero
        a.region_write(2, 6 * MiB, b"x")  # inside the provisioned size: written
        assert a.region_read(2, 6 * MiB, 1) == b"x"
        assert a.region_read(2, 0, 4) == b"vvu!"
        assert_other_device_unharmed(devd, b)
    assert devd.stop() == 0


def test_a_ram_file_whose_size_is_not_a_power_of_two(tmp_path: Path) -> None:
    size = 3 * MiB + 100
    d = TwoDevices(tmp_path, net0_ram=size)
    try:
        ram = d.ram("net0")
        with ram.open("r+b") as f:
            f.write(b"head")
            f.seek(size - 4)
            f.write(b"tail")
        with d.client("net0") as a, d.client("blk0") as b:
            assert a.get_region_info(2).info.size == 4 * MiB
            assert a.region_read(2, 0, 4) == b"head"
            # Past the file, in its last page: reads zero, writes are dropped.
            assert a.region_read(2, size - 4, 8) == b"tail" + bytes(4)
            a.region_write(2, size, b"zz")
            assert ram.stat().st_size == size
            assert a.region_read(2, size, 2) == bytes(2)
            # The trapped tail of the BAR past the page-rounded file reads zero.
            assert a.region_read(2, 3 * MiB + 2 * PAGE, 8) == bytes(8)
            assert_other_device_unharmed(d, b)
    finally:
        assert d.stop() == 0


def test_dma_maps_only_memory_sealed_against_shrinking(devd: TwoDevices) -> None:
    plain = os.memfd_create("unsealed-guest-ram", os.MFD_CLOEXEC)
    sealed = sealed_memfd("guest-ram", MiB)
    try:
        os.ftruncate(plain, MiB)
        with devd.client("net0") as a, devd.client("blk0") as b:
            with pytest.raises(RemoteError) as refused:
                a.dma_map(0, MiB, plain)  # could be truncated under devd's mapping
            assert refused.value.errno == errno.EINVAL
            devd.wait_log("back the VM's RAM with memory-backend-memfd")
            a.dma_map(0, MiB, sealed)
            with pytest.raises(PermissionError):
                os.ftruncate(sealed, 0)  # the attack the seal rules out
            a.region_write(0, NOTIFY + 4, b"\1\0")  # notify txq
            assert_serves(a)
            assert_other_device_unharmed(devd, b)
    finally:
        os.close(plain)
        os.close(sealed)
    assert devd.stop() == 0


# ------------------------------------------------------------------- resource caps


def test_an_unfinished_message_cannot_hoard_fds(devd: TwoDevices) -> None:
    with devd.client("net0") as a, devd.client("blk0") as b:
        before = devd.fd_count()
        body = 4096
        head = Header(a.next_id(), Command.REGION_WRITE, HEADER_SIZE + 16 + body).pack()
        a.send_raw(head + RegionAccess(0, 0, body).pack())
        spare = os.eventfd(0)
        pieces = 200
        try:
            for _ in range(pieces):  # 16 fds with every byte
                a.send_raw(b"\0", [spare] * MAX_MSG_FDS)
        finally:
            os.close(spare)
        wait_read_by_peer(a.sock)
        held = devd.fd_count() - before
        assert held <= MAX_MSG_FDS, f"devd holds {held} fds of one unfinished message"
        assert_other_device_unharmed(devd, b)
        a.send_raw(bytes(body - pieces))  # finish it: refused (too many fds)
        reply = a.receive()
        assert reply.header.is_error and reply.header.error == errno.EINVAL
        assert_serves(a)  # devd closes a refused message's fds after replying
        assert devd.fd_count() == before


def test_page_sized_dma_maps_cost_one_fd_per_file(devd: TwoDevices) -> None:
    ram = sealed_memfd("guest-ram", 4 * MiB)
    extra: list[int] = []
    try:
        with devd.client("net0") as a, devd.client("blk0") as b:
            before = devd.fd_count()
            # As QEMU maps 2 MiB through a vIOMMU: 512 DMA_MAPs of one page each.
            for i in range(512):
                a.dma_map(0x1000_0000 + i * PAGE, PAGE, ram, offset=(i * 7 % 1024) * PAGE)
            assert_serves(a)  # devd closes a message's fds after replying to it
            assert devd.fd_count() - before <= 1
            # Distinct files are capped.
            for i in range(MAX_DMA_FILES - 1):
                extra.append(sealed_memfd(f"file{i}", PAGE))
                a.dma_map(0x2000_0000 + i * PAGE, PAGE, extra[-1])
            with pytest.raises(RemoteError) as refused:
                extra.append(sealed_memfd("one-too-many", PAGE))
                a.dma_map(0x3000_0000, PAGE, extra[-1])
            assert refused.value.errno == errno.ENOSPC
            assert_other_device_unharmed(devd, b)
            a.dma_unmap_all()
            assert_serves(a)
            assert devd.fd_count() == before
    finally:
        for fd in (ram, *extra):
            os.close(fd)


def test_emfile_on_accept_pauses_instead_of_spinning(devd: TwoDevices) -> None:
    with devd.client("net0") as a:
        soft, hard = resource.prlimit(devd.pid, resource.RLIMIT_NOFILE)
        used = {int(n) for n in os.listdir(f"/proc/{devd.pid}/fd")}
        lowest_free = next(n for n in range(len(used) + 1) if n not in used)
        # devd can open no more fds: accept() fails with EMFILE.
        resource.prlimit(devd.pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            waiting.connect(str(devd.vfio("blk0")))  # into the backlog
            share = cpu_share(devd.pid, 1.5)
            assert share < CPU_LIMIT, f"vvu-devd used {share:.0%} of a core on EMFILE"
            assert_serves(a)  # the other device, connected before, is served
            lines = [ln for ln in devd.log().splitlines() if "Too many open files" in ln]
            assert 1 <= len(lines) <= 2, "\n".join(lines[:5])
            resource.prlimit(devd.pid, resource.RLIMIT_NOFILE, (soft, hard))
            # The waiting client is accepted once fds are back (no reconnect needed).
            b = VfioUserClient(waiting, timeout=10)
            b.version()
            assert_serves(b)
        finally:
            waiting.close()
    assert devd.stop() == 0


# ------------------------------------------------------------------- smaller items


def test_rings_in_a_read_only_dma_map_need_a_reset(devd: TwoDevices) -> None:
    ram = sealed_memfd("guest-ram", MiB)
    try:
        with devd.client("net0") as a, devd.client("blk0") as b:
            a.dma_map(0, MiB, ram, flags=DmaMapFlags.READ)

            def common(offset: int, size: int, value: int) -> None:
                a.region_write(0, offset, value.to_bytes(size, "little"))

            status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
            common(Common.DEVICE_STATUS, 1, status)
            common(Common.DRIVER_FEATURE_SELECT, 4, 1)
            features = VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM
            common(Common.DRIVER_FEATURE, 4, int(features) >> 32)
            common(Common.DEVICE_STATUS, 1, status | DeviceStatus.FEATURES_OK)
            common(Common.QUEUE_SELECT, 2, 0)
            common(Common.QUEUE_SIZE, 2, 16)
            for field, iova in ((Common.QUEUE_DESC, 0), (Common.QUEUE_DRIVER, 0x1000),
                                (Common.QUEUE_DEVICE, 0x2000)):
                common(field, 8, iova)
            common(Common.QUEUE_ENABLE, 2, 1)
            got = int.from_bytes(a.region_read(0, Common.DEVICE_STATUS, 1), "little")
            assert got & DeviceStatus.DEVICE_NEEDS_RESET
            devd.wait_log("is mapped read-only")
            assert "internal error" not in devd.log()
            assert_other_device_unharmed(devd, b)
    finally:
        os.close(ram)


@pytest.mark.parametrize("text", [
    '{"capabilities": {"max_msg_fds": ' + "9" * 100_000 + "}}",
    "[" * 100_000 + "]" * 100_000,
], ids=["100000-digit-number", "deeply-nested"])
def test_a_version_json_that_python_cannot_parse(devd: TwoDevices, text: str) -> None:
    with VfioUserClient.connect(str(devd.vfio("net0"))) as a, devd.client("blk0") as b:
        with pytest.raises(RemoteError) as refused:
            a.request(Command.VERSION, struct.pack("<HH", 0, 0) + text.encode() + b"\0")
        assert refused.value.errno == errno.EINVAL
        a.version()  # still waiting for a good one
        assert "internal error" not in devd.log()
        assert_other_device_unharmed(devd, b)


def test_a_command_with_the_error_flag_is_refused(devd: TwoDevices) -> None:
    with devd.client("net0") as a, devd.client("blk0") as b:
        payload = DeviceInfo(DeviceInfo.STRUCT.size, 0, 0, 0).pack()
        head = Header(a.next_id(), Command.DEVICE_GET_INFO, HEADER_SIZE + len(payload),
                      MsgFlags.ERROR, errno.EIO)
        a.send_raw(head.pack() + payload)
        reply = a.receive()
        assert reply.header.is_error and reply.header.error == errno.EINVAL
        devd.wait_log("ERROR flag set")
        assert_other_device_unharmed(devd, b)


@pytest.mark.parametrize("argsz", [IrqSet.STRUCT.size + 1000, IrqSet.STRUCT.size + 1])
def test_set_irqs_argsz_must_match_the_payload(devd: TwoDevices, argsz: int) -> None:
    with devd.client("net0") as a, devd.client("blk0") as b:
        flags = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER
        with pytest.raises(RemoteError) as refused:
            a.request(Command.DEVICE_SET_IRQS, IrqSet(argsz, flags, PciIrq.MSIX, 0, 1).pack())
        assert refused.value.errno == errno.EINVAL
        assert_serves(a)
        assert_other_device_unharmed(devd, b)
