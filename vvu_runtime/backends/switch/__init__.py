"""vvu-switch: an L2 learning switch whose ports are vhost-user-net connections.

``switch`` forwards, ``fdb`` learns, ``port`` is the vhost-user device per
connection, ``uplink`` the optional TAP, ``offload`` the software checksum and
segmentation, ``cli`` the ``vvu-switch`` program.
"""
