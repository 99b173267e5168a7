"""A stand-in for ``vvu-launch`` on a "host" of the Ansible playbook tests: it keeps
one lab's state in ``$FAKE_VVU_STATE`` and answers ``up``, ``down`` and ``status``
with the messages the real one prints, so the playbooks' idempotency can be checked
without VMs. Every call is appended to ``$FAKE_VVU_STATE/calls``."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    state = Path(os.environ["FAKE_VVU_STATE"])
    state.mkdir(parents=True, exist_ok=True)
    with (state / "calls").open("a") as f:
        f.write(" ".join(argv) + "\n")
    lab = state / "lab.json"
    cmd = argv[0]
    if cmd == "up":
        host = argv[argv.index("--host") + 1]
        if lab.exists():
            print("vvu-launch: lab is already running (supervisor pid 1); nothing changed",
                  file=sys.stderr)
            return 0
        lab.write_text(json.dumps({"host": host, "topology": Path(argv[-1]).read_text()}))
        print("vvu-launch: lab is up in 1 s", file=sys.stderr)
        return 0
    if cmd == "down":
        if not lab.exists():
            print(f"vvu-launch: error: no lab {argv[-1]!r}", file=sys.stderr)
            return 1
        lab.unlink()
        print(f"vvu-launch: stopping lab {argv[-1]} (supervisor pid 1)…", file=sys.stderr)
        print(f"vvu-launch: lab {argv[-1]} is down", file=sys.stderr)
        if "--cleanup" in argv:
            shutil.rmtree(state / "labdir", ignore_errors=True)
        return 0
    if cmd == "status":
        if not lab.exists():
            print(f"vvu-launch: error: no lab {argv[-1]!r}", file=sys.stderr)
            return 1
        host = json.loads(lab.read_text())["host"]
        node = {"name": f"sw-{host}", "role": "appliance", "kind": "vswitch",
                "state": "ready", "pid": 4242, "restarts": 0, "ssh_port": 40001}
        link = {"name": f"c-{host}-nic0", "kind": "net", "consumer": f"c-{host}",
                "appliance": f"sw-{host}", "status": "0x7", "kicks": 5, "errors": 0}
        print(json.dumps({"name": argv[-1], "host": host, "phase": "running", "accel": "tcg",
                          "nodes": [node], "links": [link]}))
        return 0
    print(f"fake vvu-launch: {cmd} is not faked", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
