"""vvu_runtime.launch.topology: the topology file's schema, loader and model."""

from __future__ import annotations

from pathlib import Path

import pytest

from vvu_runtime.launch.topology import (
    ApplianceKind,
    Topology,
    load_topology,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    topo = load_topology(path)
    assert isinstance(topo, Topology)
    assert topo.name == path.stem


def test_default_example_is_the_readme_job() -> None:
    topo = load_topology(ROOT / "examples" / "default.yaml")
    kinds = sorted(a.kind.value for a in topo.appliances)
    assert kinds == [ApplianceKind.STORAGE.value, ApplianceKind.VSWITCH.value]
    assert len(topo.consumers) == 2
    assert all(c.nics and c.disks for c in topo.consumers)
    assert topo.checks
