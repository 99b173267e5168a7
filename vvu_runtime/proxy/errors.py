"""Errors of vvu-proxy.

Exception tree::

    ProxyError                 base
     ├── BackendFault          the back-end sent what the protocol or the tunnel does
     │                         not allow (a reply nobody asked for, fds on a reply, a
     │                         back-end request that needs a masked feature): that
     │                         link is reset, the others go on
     └── TunnelFault           a message from the VVU device that the proxy cannot
                               translate (a region outside the shared memory, a
                               request the proxy does not relay): that link is reset

Errors wrapping another exception keep it as ``__cause__``.
"""

from __future__ import annotations

from vvu_runtime.errors import VvuError


class ProxyError(VvuError):
    """Base of vvu-proxy's errors."""


class BackendFault(ProxyError):
    """Bad input from the back-end."""


class TunnelFault(ProxyError):
    """A front-end message (from the VVU device) the proxy cannot translate."""


__all__ = ["BackendFault", "ProxyError", "TunnelFault"]
