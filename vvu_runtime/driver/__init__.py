"""The guest side of virtio-vhost-user: a userspace driver for the VVU PCI function.

Inside an appliance VM this package runs the VVU device (docs/vvu-abi.md) and
hands the unchanged vhost-user back-end session a transport built on it, so
``vvu-blk --vvu ADDR`` and ``vvu-switch --vvu NAME=ADDR`` serve a consumer VM
from inside a VM. Layers, bottom up::

    pci.PciFunction         config space, BAR registers and windows, MSI-X eventfds,
      vfio.VfioPciFunction    DMA buffers; vfio-pci behind a vIOMMU (primary),
      sysfs.SysfsPciFunction  sysfs + hugetlb/pagemap without one (poll mode),
    virtio_pci.VirtioPciDriver   the modern virtio-pci transport, driver side
    vvu.VvuDriver                rxq/txq messages, status, kick vectors, doorbells,
                                 the shared-memory BAR (the consumer's RAM file)
    transport.VvuChannel / VvuTransport   the vhost_user Channel and Transport seams
    endpoint.VvuEndpoint         one BackendSession per front-end connection, the
                                 BACKEND_UP / FRONTEND_UP state machine, recovery

``serve.runner.Endpoint(device, vvu=ADDR)`` is how a backend program asks for
it. Nothing above ``pci`` knows whether it runs on vfio, sysfs or the test double
(tests/support/vfio_user_function.py: the in-process vfio-user client).
"""
