"""vvu: virtio-vhost-user appliances and the vhost-user backends they carry."""
