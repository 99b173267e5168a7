"""The topology file (``topology.yaml``) of a vvu lab: schema, loader, resolved model.

* ``model.py``: the resolved topology (frozen dataclasses, enums) and
  :class:`TopologyError` / :class:`Problem` / :class:`Location`.
* ``schema.py``: the one table of fields; :func:`json_schema` and
  :func:`schema_text` are generated from it.
* ``types.py`` / ``spec.py``: value types and object specs the table is made of.
* ``loader.py``: :func:`load_topology` (YAML with positions, the schema,
  inheritance, derived values, cross-reference checks; every problem at once).

Use: ``topo = load_topology(path)`` (or ``load_topology_text(text, source)``),
then ``topo.appliances`` / ``topo.consumers`` / ``topo.checks`` (file order),
``topo.node(name)``, ``topo.links_of(appliance)`` -> ``[(consumer, Nic | Disk)]``
and ``topo.to_json()``. Placement (docs/fleet.md): ``topo.hosts``, each node's
``host``, a vswitch's ``tunnels``, and ``topo.slice(host)``: the part one host
runs. Everything is resolved: defaults inherited, subnets, MACs and addresses
derived, paths absolute (relative to the file), memory in MiB
(``memory_mib``), export and transfer sizes in bytes. ``json_schema()`` and
``schema_text()`` are what ``vvu-launch schema`` prints.

Errors: :class:`TopologyError` only; its ``problems`` name ``FILE:LINE:COL``,
the field path and what was expected, in file order, all of them at once.
"""

from vvu_runtime.launch.topology.loader import derived_mac, load_topology, load_topology_text
from vvu_runtime.launch.topology.model import (
    Accel,
    Appliance,
    ApplianceAccess,
    ApplianceKind,
    Check,
    CheckKind,
    Consumer,
    ConsumerImage,
    Disk,
    DiskProtocol,
    Export,
    FsMount,
    Host,
    Location,
    Nic,
    Node,
    Options,
    Problem,
    Role,
    Topology,
    TopologyError,
    Tunnel,
)
from vvu_runtime.launch.topology.schema import json_schema, schema_text

__all__ = [
    "Accel",
    "Appliance",
    "ApplianceAccess",
    "ApplianceKind",
    "Check",
    "CheckKind",
    "Consumer",
    "ConsumerImage",
    "Disk",
    "DiskProtocol",
    "Export",
    "FsMount",
    "Host",
    "Location",
    "Nic",
    "Node",
    "Options",
    "Problem",
    "Role",
    "Topology",
    "TopologyError",
    "Tunnel",
    "derived_mac",
    "json_schema",
    "load_topology",
    "load_topology_text",
    "schema_text",
]
