"""A lab spread over several hosts: the Ansible inventory of its ``hosts:``.

``vvu-launch inventory TOPOLOGY`` prints it; the playbooks of ``ansible/`` run
against it (docs/fleet.md). One inventory host per topology host, in the group
``vvu_hosts``, with:

* the connection (``ansible_host``, ``ansible_user``,
  ``ansible_ssh_private_key_file``) from ``hosts.NAME``; a host given as
  ``inventory: X`` is written as ``X`` without connection variables, so that
  the operator's own inventory (passed as a second ``-i``) supplies them;
* ``vvu_host`` (its name in the topology: what ``vvu-launch up --host`` takes),
  ``vvu_nodes`` (what runs there) and ``vvu_tunnel_ports`` (the UDP ports its
  switch appliances receive tunnels on: the firewall must let them in).

The lab-wide variables are ``vvu_lab`` (the lab's name) and ``vvu_topology_file``
(the file's name, which ``deploy.yml`` copies to every host).
"""

from __future__ import annotations

import io
from typing import Any

from ruamel.yaml import YAML

from vvu_runtime.launch.topology import Topology

__all__ = ["FLEET_GROUP", "fleet_inventory", "inventory_data"]

#: The inventory group of the hosts of a lab.
FLEET_GROUP = "vvu_hosts"


def inventory_data(topo: Topology) -> dict[str, Any]:
    """The inventory as plain data (Ansible's YAML inventory format)."""
    hosts: dict[str, dict[str, Any]] = {}
    for h in topo.hosts:
        entry: dict[str, Any] = {}
        if h.inventory is None:
            entry["ansible_host"] = h.address
            entry["ansible_user"] = h.user
            if h.key is not None:
                entry["ansible_ssh_private_key_file"] = str(h.key)
        entry["vvu_host"] = h.name
        entry["vvu_nodes"] = [n.name for n in topo.nodes_on(h.name)]
        entry["vvu_tunnel_ports"] = sorted({a.underlay_port for a in topo.appliances
                                            if a.host == h.name and a.tunnels})
        hosts[h.inventory or h.name] = entry
    return {"all": {"vars": {"vvu_lab": topo.name, "vvu_topology_file": topo.source.name},
                    "children": {FLEET_GROUP: {"hosts": hosts}}}}


def fleet_inventory(topo: Topology) -> str:
    """The inventory as YAML text, with a header saying where it came from."""
    yaml = YAML()
    yaml.default_flow_style = False
    out = io.StringIO()
    out.write(f"# Ansible inventory of the hosts of vvu lab {topo.name}\n"
              f"# (vvu-launch inventory {topo.source.name}; docs/fleet.md)\n")
    yaml.dump(inventory_data(topo), out)
    return out.getvalue()
