"""The harnesses' side of a socket pair: read and drop whatever the code under
test sent, closing every fd that came with it (they would count as leaks)."""

from __future__ import annotations

import socket

from vvu_runtime.fds import close_fds, fds_from_ancdata


def drain(peer: socket.socket, anc_space: int,
          ignore: tuple[type[OSError], ...] = (BlockingIOError, ConnectionError)) -> None:
    """Read ``peer`` until it would block or is closed; errors in ``ignore`` end it."""
    while True:
        try:
            data, anc, _, _ = peer.recvmsg(1 << 16, anc_space, socket.MSG_CMSG_CLOEXEC)
        except ignore:
            return
        close_fds(fds_from_ancdata(anc))
        if not data:
            return
