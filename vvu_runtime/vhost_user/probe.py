"""``vvu-probe SOCKET``: ask a vhost-user back-end what it offers, print it readably.

Connects as a front-end, does the discovery half of QEMU's init (GET_FEATURES,
GET/SET_PROTOCOL_FEATURES, SET_OWNER, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
GET_CONFIG) and prints a table: virtio features by name, protocol features by
name, queue count, memory slots, and the config space decoded as virtio-net or
virtio-blk when the device kind can be told (``--type`` forces it). Starts no
ring and maps no memory. Exit status 0 on success; 1 with a one-line message when
the socket is missing, refuses the connection, or does not speak vhost-user.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vvu_runtime.console import die, run_main
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import VhostUserError
from vvu_runtime.vhost_user.frontend import VhostUserFrontend
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.virtio.features import VhostFeature, VirtioFeature

#: Config sizes to try, biggest first (back-ends refuse reads past their config).
CONFIG_SIZES = (256, 72, 60, 24, 8)

COMMON_NAMES = {f.value.bit_length() - 1: str(f.name) for f in VirtioFeature}
COMMON_NAMES.update({f.value.bit_length() - 1: str(f.name) for f in VhostFeature})
PROTOCOL_NAMES = {f.value: f.name for f in PF}


def _device_names(kind: str) -> dict[int, str]:
    if kind == "net":
        from vvu_runtime.virtio.net import NetFeature

        return {f.value: f"NET_{f.name}" for f in NetFeature}
    if kind == "blk":
        from vvu_runtime.virtio.blk import Feature

        return {f.value: f"BLK_{f.name}" for f in Feature}
    return {}


def guess_kind(features: int, config: bytes | None) -> str:
    """'net', 'blk' or 'unknown', from feature bits and the config space."""
    net_only = (1 << 15) | (1 << 16) | (1 << 17) | (1 << 0)   # MRG_RXBUF, STATUS, CTRL_VQ, CSUM
    blk_only = (1 << 9) | (1 << 6) | (1 << 12) | (1 << 13)    # FLUSH, BLK_SIZE, MQ, DISCARD
    score_net = bin(features & net_only).count("1")
    score_blk = bin(features & blk_only).count("1")
    if config is not None and len(config) >= 24 and score_blk >= score_net:
        capacity = int.from_bytes(config[0:8], "little")
        blk_size = int.from_bytes(config[20:24], "little")
        if capacity and (not features >> 6 & 1 or (blk_size and not blk_size & (blk_size - 1))):
            return "blk"
    if score_net > score_blk:
        return "net"
    if score_blk > score_net:
        return "blk"
    return "unknown"


def decode_config(kind: str, config: bytes) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    try:
        if kind == "net":
            from vvu_runtime.virtio.net import NetConfig, format_mac

            net = NetConfig.unpack(config[:24].ljust(24, b"\0"))
            rows += [("mac", format_mac(net.mac)), ("status", f"{net.status:#x}"),
                     ("max_virtqueue_pairs", str(net.max_virtqueue_pairs)),
                     ("mtu", str(net.mtu))]
        elif kind == "blk":
            from vvu_runtime.virtio.blk import BlkConfig

            blk = BlkConfig.unpack(config[:72].ljust(72, b"\0"))
            rows += [("capacity", f"{blk.capacity} sectors ({blk.capacity * 512} bytes)"),
                     ("blk_size", str(blk.blk_size)), ("seg_max", str(blk.seg_max)),
                     ("size_max", str(blk.size_max)), ("num_queues", str(blk.num_queues)),
                     ("writeback", str(blk.writeback))]
    except (ValueError, TypeError, IndexError) as exc:  # pragma: no cover - defensive
        rows.append(("decode error", str(exc)))
    return rows


def probe(path: str, timeout: float, kind: str) -> list[tuple[str, str]]:
    """The rows of the report. Raises VhostUserError."""
    with VhostUserFrontend.connect(path, timeout=timeout) as fe:
        rows: list[tuple[str, str]] = []
        features = fe.get_features()
        pf = 0
        if features & m.VHOST_USER_F_PROTOCOL_FEATURES:
            pf = fe.get_protocol_features()
            want = pf & m.protocol_mask(PF.MQ, PF.REPLY_ACK, PF.CONFIG, PF.CONFIGURE_MEM_SLOTS,
                                        PF.STATUS)
            fe.set_protocol_features(want)
        fe.set_owner()
        config: bytes | None = None
        config_note = "not offered (no CONFIG protocol feature)"
        if pf >> PF.CONFIG & 1:
            for size in CONFIG_SIZES:
                try:
                    config = fe.get_config(0, size)
                    break
                except VhostUserError as exc:
                    config_note = f"refused ({exc})"
                    if fe.channel.closed:
                        break
        if kind == "auto":
            kind = guess_kind(features, config)
        names = dict(COMMON_NAMES)
        names.update(_device_names(kind))
        rows.append(("socket", path))
        rows.append(("device kind", kind if kind != "unknown" else "unknown (use --type)"))
        rows.append(("features", f"{features:#018x}"))
        for name in m.features_by_name(features, names):
            rows.append(("", name))
        rows.append(("protocol features", f"{pf:#x}"))
        for name in m.features_by_name(pf, PROTOCOL_NAMES):
            rows.append(("", name))
        if pf >> PF.MQ & 1:
            rows.append(("queues", str(fe.get_queue_num())))
        else:
            rows.append(("queues", "(MQ not offered)"))
        if pf >> PF.CONFIGURE_MEM_SLOTS & 1:
            rows.append(("max mem slots", str(fe.get_max_mem_slots())))
        if pf >> PF.STATUS & 1:
            rows.append(("status", f"{fe.get_status():#x}"))
        if config is None:
            rows.append(("config", config_note))
        else:
            rows.append(("config", f"{len(config)} bytes: {config[:32].hex(' ')}"
                                   + (" ..." if len(config) > 32 else "")))
            rows += [(f"  {k}", v) for k, v in decode_config(kind, config)]
        return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vvu-probe",
        description="Show what a vhost-user back-end offers (features, queues, config).")
    parser.add_argument("socket", help="path of the back-end's vhost-user UNIX socket")
    parser.add_argument("--type", choices=("auto", "net", "blk"), default="auto",
                        help="how to decode device features and config (default: guess)")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds to wait for each reply (default 3)")
    args = parser.parse_args(argv)

    def show() -> None:
        try:
            rows = probe(args.socket, args.timeout, args.type)
        except VhostUserError as exc:
            die(f"{args.socket} is not a usable vhost-user back-end: {exc}")
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")

    return run_main(show, program="vvu-probe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
