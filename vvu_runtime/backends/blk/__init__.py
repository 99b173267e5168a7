"""vvu-blk: a vhost-user-blk target on a raw image (device logic, image access, CLI)."""
