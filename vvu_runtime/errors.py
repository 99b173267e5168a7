"""The root of every layer's exception tree.

Each layer has its own tree (``virtio.errors.VirtioError``,
``vhost_user.errors.VhostUserError``, ``device.errors.DeviceError``,
``driver.errors.DriverError``, ``backends.blk.image.ImageError``,
``fds.FdError``); all of them derive from :class:`VvuError`, so a command's
last line of defence (:func:`vvu_runtime.console.run_main`) turns any of them
into one ``PROG: error: ...`` line instead of a traceback. Messages are written
for the person who runs the command: what failed, on what, and what to do.
"""

from __future__ import annotations


class VvuError(Exception):
    """Something vvu cannot do; the message says what and, where it can, why."""
