"""The optional uplink: a TAP device that connects the switch to the host's stack.

The TAP is opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` and a 12-byte
virtio-net header (``TUNSETVNETHDRSZ``), so frames cross in both directions
with the same header the guests use and offloads stay end to end:

* **to the host** (we write): the kernel takes any GSO type and partial
  checksums (``virtio_net_hdr_to_skb``), so every frame goes as it is.
* **from the host** (we read): ``TUNSETOFFLOAD`` tells the kernel which
  offloads we can take (CSUM, TSO4/6, ECN, UFO, USO4/6 where the kernel knows
  them); the kernel then hands us up to 64 KiB TCP segments with NEEDS_CSUM,
  which the switch passes to guests that can take them and segments for the rest.

Bringing the interface up, addressing it or enslaving it to a bridge is the
operator's business (``ip link set tap0 up``); the switch only attaches.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct

from vvu_runtime.backends.switch.switch import (
    Drop,
    ForwardedFrame,
    ForwardingPort,
    PortKind,
    Switch,
)
from vvu_runtime.virtio.net import HDR_SIZE, NetFeature, feature_mask

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

_IFREQ = struct.Struct("16sH22x")

#: Offload sets to try, best first (USO needs Linux 6.2, UFO was missing 4.14-4.17).
_OFFLOAD_CHOICES = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
    TUN_F_CSUM,
    0,
)

#: What the kernel takes from us: everything (it segments in software if needed).
_TO_KERNEL = feature_mask(
    NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6,
    NetFeature.GUEST_ECN, NetFeature.GUEST_UFO, NetFeature.GUEST_USO4, NetFeature.GUEST_USO6,
)

#: Frames read per readable event before other ports get the loop back.
READ_BATCH = 256
#: A 64 KiB GSO frame plus headers.
READ_BUFFER = 65536 + 256


def tun_offloads_to_features(flags: int) -> int:
    """virtio-net HOST_* bits matching what we asked the kernel to send us."""
    features = 0
    if flags & TUN_F_CSUM:
        features |= NetFeature.CSUM.mask
    if flags & TUN_F_TSO4:
        features |= NetFeature.HOST_TSO4.mask
    if flags & TUN_F_TSO6:
        features |= NetFeature.HOST_TSO6.mask
    if flags & TUN_F_TSO_ECN:
        features |= NetFeature.HOST_ECN.mask
    if flags & TUN_F_UFO:
        features |= NetFeature.HOST_UFO.mask
    if flags & TUN_F_USO4 and flags & TUN_F_USO6:
        features |= NetFeature.HOST_USO.mask
    return features


class UplinkError(OSError):
    """The TAP device could not be opened or configured (``errno`` kept)."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


_TUNSETIFF_HINTS = {
    errno.EPERM: " (needs CAP_NET_ADMIN, or a TAP created for this user)",
    errno.EINVAL: " (an interface of that name exists and is not a TAP?)",
    errno.EBUSY: " (another process has that TAP open)",
}


class TapUplink(ForwardingPort):
    """A TAP interface as a switch port."""

    trusted_data_valid = True  # the host kernel checked the checksum

    def __init__(self, switch: Switch, ifname: str) -> None:
        if not ifname or len(ifname.encode()) > 15 or "/" in ifname:
            raise ValueError(f"TAP name {ifname!r}: 1-15 characters, no '/'")
        super().__init__(ifname, kind=PortKind.UPLINK)
        self.ifname = ifname
        self.fd = -1
        self.tun_offloads = 0
        self._buf = bytearray(READ_BUFFER)
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._write_errors = 0
        switch.add_port(self)

    # -------------------------------------------------------------- life cycle
    def open(self) -> None:
        """Open (or create) the TAP and set the header size and offloads."""
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise UplinkError(f"uplink {self.ifname}: cannot open {TUN_DEVICE}: "
                              f"{exc.strerror}", exc.errno) from exc
        try:
            req = _IFREQ.pack(self.ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                fcntl.ioctl(fd, TUNSETIFF, req)
            except OSError as exc:
                hint = _TUNSETIFF_HINTS.get(exc.errno or 0, "")
                raise UplinkError(f"uplink {self.ifname}: cannot attach the TAP: "
                                  f"{exc.strerror}{hint}", exc.errno) from exc
            try:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_SIZE))
            except OSError as exc:
                raise UplinkError(f"uplink {self.ifname}: cannot set the virtio-net "
                                  f"header size: {exc.strerror}", exc.errno) from exc
            chosen = 0
            for flags in _OFFLOAD_CHOICES:
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
                except OSError:
                    continue
                chosen = flags
                break
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.tun_offloads = chosen
        self.hdr_size = HDR_SIZE
        self.set_offloads(_TO_KERNEL, send=tun_offloads_to_features(chosen))
        log.info("%s: attached (offloads from the kernel: %s)", self.name,
                 _describe_tun(chosen))

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open if needed and start reading frames in ``loop``."""
        if self.fd < 0:
            self.open()
        self._loop = loop
        loop.add_reader(self.fd, self.on_readable)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.fd)
        self._loop = None
        os.close(self.fd)
        self.fd = -1
        if self.switch is not None:
            self.switch.port_down(self)

    # ------------------------------------------------------------------ ingress
    def on_readable(self) -> None:
        """Read a batch of frames from the kernel and forward them."""
        switch = self.switch
        if switch is None or self.fd < 0:
            return
        view = self._view
        try:
            for _ in range(READ_BATCH):
                try:
                    n = os.readv(self.fd, [self._buf])
                except BlockingIOError:
                    break
                except OSError as exc:
                    log.warning("%s: read failed: %s", self.name, exc)
                    break
                if n <= 0:
                    break
                switch.forward_buffer(self, view[:n], HDR_SIZE)
        finally:
            switch.flush_notifications()

    # ------------------------------------------------------------------- egress
    @property
    def up(self) -> bool:
        return self.fd >= 0

    def status_line(self) -> str:
        return "up (tap)" if self.fd >= 0 else "down (tap)"

    def deliver(self, frame: ForwardedFrame) -> None:
        if self.fd < 0:
            self.counters.drop(Drop.PORT_DOWN)
            return
        views = frame.views
        v0 = views[0]
        if frame.hdr_size == HDR_SIZE and len(v0) >= HDR_SIZE and not frame.rewrite_flags:
            out: list[memoryview | bytes | bytearray] = list(views)
        else:
            hdr = bytearray(HDR_SIZE)
            src = v0 if len(v0) >= frame.hdr_size else memoryview(frame.linear())
            hdr[0:10] = src[0:10]
            if frame.rewrite_flags:
                hdr[0] = frame.flags
            out = [hdr, *frame.payload_views()]
        try:
            os.writev(self.fd, out)
        except OSError as exc:
            self.counters.drop(Drop.UPLINK_ERROR)
            self._write_errors += 1
            n = self._write_errors
            if exc.errno != errno.EAGAIN and n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th ...
                log.warning("%s: write failed (%d so far): %s", self.name, n, exc)
            return
        c = self.counters
        c.out_packets += 1
        c.out_bytes += frame.length - frame.hdr_size


def _describe_tun(flags: int) -> str:
    names = [("csum", TUN_F_CSUM), ("tso4", TUN_F_TSO4), ("tso6", TUN_F_TSO6),
             ("ecn", TUN_F_TSO_ECN), ("ufo", TUN_F_UFO), ("uso4", TUN_F_USO4),
             ("uso6", TUN_F_USO6)]
    return ",".join(n for n, f in names if flags & f) or "none"
