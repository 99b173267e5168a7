"""vhost-user-scsi target: one controller, several LUNs on raw images."""
