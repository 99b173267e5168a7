"""Lab plans for unit tests: a topology planned with stand-in image paths, and
the appliance config the launcher hands an appliance VM as a credential."""

from __future__ import annotations

import base64
from pathlib import Path

from vvu_runtime.launch.accel import Accelerator
from vvu_runtime.launch.lab import ImageFiles, LabPaths, LabPlan, plan_lab
from vvu_runtime.launch.topology import Topology

#: Image files that need not exist: planning only names them.
IMAGES = {kind: ImageFiles(kernel=Path(f"/images/{kind}.vmlinuz"),
                           initrd=Path(f"/images/{kind}.initrd"), cmdline="console=ttyS0",
                           disk=Path(f"/images/{kind}.raw"))
          for kind in ("vswitch", "storage", "consumer")}


def plan(topo: Topology) -> LabPlan:
    """``topo`` planned under /labs and /run/vvu, on TCG, with fixed SSH ports
    (40001 up, appliances first) so that no free port is looked for."""
    names = [a.name for a in topo.appliances] + [c.name for c in topo.consumers]
    paths = LabPaths(name=topo.name, root=Path(f"/labs/{topo.name}"),
                     run=Path(f"/run/vvu/{topo.name}"))
    return plan_lab(topo, paths, accel=Accelerator.TCG, accel_reason="test", public_key="k",
                    images=IMAGES, ports={n: 40001 + i for i, n in enumerate(names)})


def appliance_config(lab: LabPlan, node: str) -> str:
    """The ``vvu.appliance`` credential (the appliance's config) on ``node``'s QEMU command line."""
    argv = lab.node(node).argv
    for i, a in enumerate(argv):
        if a == "-smbios" and "credential.binary:vvu.appliance=" in argv[i + 1]:
            return base64.b64decode(argv[i + 1].split("vvu.appliance=", 1)[1]).decode()
    raise AssertionError(f"{node} has no vvu.appliance credential")
