"""The backend programs: ``vvu-blk`` and ``vvu-switch``, and the runner they share.

This is where a backend device (``vvu_runtime.backends``) meets a transport: a
vhost-user UNIX socket (``vvu_runtime.vhost_user.server``) on a host, or a
virtio-vhost-user PCI function (``vvu_runtime.driver``) inside an appliance.
The backends themselves know neither.
"""
