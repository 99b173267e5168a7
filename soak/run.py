"""Soak, long variant: one vvu-launch lab (storage appliance st1, consumer c1 with a disk
from it, consumer c2 wired to nothing), c1 writing verified records (O_DIRECT + fsync,
acknowledged only after fsync) through

  1. N clean backend restarts (c1's vhost-user session closed, c1 reconnects),
  2. M kill -9 of vvu-blk inside st1 (systemd restarts it; no VM may restart),
  3. K kill -9 of st1's vvu-devd (the lab's supervisor heals it), each with one more
     record written before the kill and flushed only after the heal,
  4. the isolation scan (an appliance sees only the RAM of consumers wired to it),
  5. kill -9 of st1's QEMU right after c1's last FLUSH completed.

After each phase every acknowledged record is read back in c1 with O_DIRECT and looked
for in st1's data-disk image on the host. Every loop is bounded and every wait has a
deadline: the run stops by itself. Prints one line per phase and a JSON summary; exit 1
if a record was lost or a check failed. Hold the machine's heavy-work lock around it:

    flock /tmp/vvu-heavy.lock .venv/bin/python soak/run.py [--reconnects 100]
        [--backend-kills 20] [--devd-kills 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.launch_lab import Lab, explain  # noqa: E402
from tests.support.soak_lab import PhaseResult, SoakLab, topology_yaml  # noqa: E402


def _line(r: PhaseResult) -> str:
    return (f"{r.name}: {r.disruptions} disruptions, {r.acknowledged} acknowledged, "
            f"{r.verified_in_consumer} verified in c1, {r.verified_in_image} in the image, "
            f"{len(r.lost)} lost, {r.errors_seen} write errors seen, {r.seconds} s")


def soak(args: argparse.Namespace, lab: Lab) -> dict[str, Any]:
    s = SoakLab(lab, args.export_mib)
    s.install_writer()
    phases: list[PhaseResult] = []
    failures: list[str] = []
    pids = s.qemu_pids()

    def run(name: str, disrupt: Any, times: int) -> None:
        if times <= 0:
            return
        # Enough room for the run at the writer's pace, bounded by the export.
        r = s.phase(name, disrupt, times, count=args.records_per_phase)
        phases.append(r)
        print(_line(r), flush=True)
        if r.lost or not r.verified_in_consumer == r.verified_in_image == r.acknowledged:
            failures.append(f"{name}: lost {r.lost[:10]}")

    run("reconnects (clean vvu-blk restarts)", s.restart_backend, args.reconnects)
    run("kill -9 of vvu-blk", s.kill_backend, args.backend_kills)
    if s.qemu_pids() != pids:
        failures.append(f"a VM restarted during backend restarts: {pids} -> {s.qemu_pids()}")
    held: list[PhaseResult] = []

    def kill_devd_across_a_held_write(i: int) -> None:
        # One more record, written and completed before the kill, flushed only after
        # the heal (on the new appliance): it must not have lived in the old one's
        # page cache alone.
        writer = s.held_write()
        s.kill_devd(i)
        held.append(s.flush_held(writer, "held write", 1))

    run("kill -9 of vvu-devd", kill_devd_across_a_held_write, args.devd_kills)
    if held:
        r = PhaseResult(
            name="writes completed before a vvu-devd kill, flushed after it",
            disruptions=len(held), acknowledged=sum(h.acknowledged for h in held),
            verified_in_consumer=sum(h.verified_in_consumer for h in held),
            verified_in_image=sum(h.verified_in_image for h in held),
            lost=[x for h in held for x in h.lost],
            errors_seen=sum(h.errors_seen for h in held),
            seconds=round(sum(h.seconds for h in held), 1))
        phases.append(r)
        print(_line(r), flush=True)
        if r.lost or not r.verified_in_consumer == r.verified_in_image == r.acknowledged:
            failures.append(f"held writes across vvu-devd kills: lost {r.lost[:10]}")
    isolation = s.isolation()
    print(f"isolation: {json.dumps(isolation)}", flush=True)
    vvu_found = [f["bar2_found"] for f in isolation["bars"] if f["device"] == "0x107f"]
    if isolation["ram_files"] != {"c1": ["c1"], "c2": ["c2"]} or vvu_found != [["c1"]] or any(
            "c2" in (f["bar2_found"] or []) for f in isolation["bars"]):
        failures.append(f"isolation: {isolation}")
    r, _ = s.kill_appliance_after_flush(args.flush_records)
    phases.append(r)
    print(_line(r), flush=True)
    if r.lost or r.verified_in_image != r.acknowledged:
        failures.append(f"after QEMU kill: lost {r.lost[:10]}")
    return {"phases": [p.to_json() for p in phases], "isolation": isolation,
            "failures": failures}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reconnects", type=int, default=100)
    p.add_argument("--backend-kills", type=int, default=20)
    p.add_argument("--devd-kills", type=int, default=1)
    p.add_argument("--flush-records", type=int, default=500)
    p.add_argument("--records-per-phase", type=int, default=60000)
    p.add_argument("--export-mib", type=int, default=1024)
    p.add_argument("--json", type=Path, help="write the summary here too")
    args = p.parse_args()
    need = (3 * args.records_per_phase + args.flush_records) * 4096
    if need > args.export_mib << 20:
        p.error(f"--export-mib {args.export_mib} holds fewer than the {need >> 20} MiB "
                "the phases may write")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vvu-soak-") as state:
        name = f"soak-long-{os.getpid() % 100000}"
        topology = Path(state) / "soak.yaml"
        topology.write_text(topology_yaml(name, args.export_mib))
        lab = Lab(name=name, topology=topology, state_dir=Path(state))
        summary: dict[str, Any] = {"failures": ["lab did not come up"]}
        try:
            r = lab.vvu("up", "--detach", "--no-check", "--name", name, str(topology),
                        timeout=1200)
            if r.returncode != 0:
                print(f"vvu-launch up failed: {explain(r)}\n{lab.supervisor_log()}")
                return 1
            summary = soak(args, lab)
        finally:
            down = lab.vvu("down", name, "--cleanup", timeout=300)
            left = lab.leftovers()
            summary["down"] = down.returncode
            summary["leftovers"] = left
            summary["wall_seconds"] = round(time.monotonic() - start, 1)
            print(json.dumps(summary, indent=2))
            if args.json:
                args.json.write_text(json.dumps(summary, indent=2))
    return 1 if summary["failures"] or summary["leftovers"] or summary["down"] else 0


if __name__ == "__main__":
    sys.exit(main())
