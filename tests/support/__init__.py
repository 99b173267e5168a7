"""Test doubles, fakes and rigs shared by the tests and the benchmarks.

Nothing under ``vvu_runtime`` imports from here (tests/unit/test_layers.py checks):

* ``vfio_user_client``   a blocking vfio-user client that talks the way QEMU's does
* ``loop_thread``        an asyncio loop in a background thread, driven with ``call``
* ``server_thread``      a vfio-user server's event loop in a background thread
* ``vfio_user_function`` a driver ``PciFunction`` over that client (stands in for vfio-pci)
* ``entropy``            a toy virtio-rng device on the vfio-user server
* ``net_frames``         frame builders, checksum checks, a fake ring, a driver-side port
* ``blk_driver``         a minimal virtio-blk driver in a front-end's guest RAM
* ``vhost_user_harness`` an event-loop thread for back-end sessions, an echo device
* ``vvu_chain``          the whole VVU chain in one process (device model + appliance)
* ``devd``               vvu-devd in its own process (log, counters table, clients)
* ``vvu_rig``            the real-VM rig: consumer VMs, vvu-devd, an appliance VM
"""
