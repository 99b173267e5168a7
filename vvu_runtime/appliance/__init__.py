"""The guest side of a vvu appliance: what runs inside the appliance image.

* :mod:`~vvu_runtime.appliance.config`: the appliance configuration
  (``/etc/vvu/appliance.yaml`` or the ``vvu.appliance`` credential): one schema,
  a JSON / small-YAML reader that keeps line numbers, errors naming file, line
  and field;
* :mod:`~vvu_runtime.appliance.functions`: the VVU PCI functions in sysfs and
  the uuid in their device config (links are matched by it);
* :mod:`~vvu_runtime.appliance.backend`: ``vvu-backend``, the entry point of the
  backend units (``Type=notify``): validates the config, starts ``vvu-switch`` /
  ``vvu-blk`` on the matched functions, reports READY/STATUS/WATCHDOG;
* :mod:`~vvu_runtime.appliance.wheel`: builds and installs the guest runtime as a
  wheel during the mkosi build, and the source digest;
* :mod:`~vvu_runtime.appliance.info`: ``vvu-appliance-info`` (version + digest).

Only the standard library: this runs on the appliance's bare python3. It may
import ``virtio``, ``vhost_user``, ``driver`` and ``backends``; nothing there
imports it.
"""
