"""vvu-proxy: any unmodified vhost-user back-end behind a VVU function.

Inside an appliance, :class:`~vvu_runtime.proxy.link.ProxyLink` drives one VVU
function with the guest driver (``vvu_runtime.driver``) and re-exports the
consumer's vhost-user session on an ordinary UNIX socket, so that a stock
back-end (virtiofsd, qemu-storage-daemon, DPDK) sees a normal front-end;
:class:`~vvu_runtime.proxy.relay.ProxySession` translates one session's
messages and fds (memory as a file of the shared-memory BAR, kicks as the MSI-X
eventfds, calls relayed to the doorbells, back-end requests through txq,
INFLIGHT_SHMFD from a memfd the proxy keeps). ``vvu-proxy`` is the command
(:mod:`vvu_runtime.proxy.cli`).
"""
