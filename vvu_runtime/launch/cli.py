"""``vvu-launch``: wire consumer VMs to appliance VMs, run, check, watch and tear down labs.

    vvu-launch validate TOPOLOGY          check a topology file (all errors, file:line:col)
    vvu-launch render TOPOLOGY            print every command line; start nothing
    vvu-launch schema [--json]            the topology file's fields (or its JSON Schema)
    vvu-launch up TOPOLOGY [--detach] [--host H]
                                          bring a lab (or host H's slice of it) up, run its
                                          checks, show its status
    vvu-launch inventory TOPOLOGY         the Ansible inventory of the topology's hosts
    vvu-launch down [LAB] [--cleanup]     stop a lab from its recorded state
    vvu-launch status [LAB] [--json]      nodes and links of a lab
    vvu-launch check [LAB]                run the topology's checks (exit 1 on a failure)
    vvu-launch logs [--lab LAB] NODE [-f] a node's console (or --qemu, --devd) log
    vvu-launch ssh [--lab LAB] NODE [-- CMD]
    vvu-launch graph [LAB|TOPOLOGY]       Mermaid text of nodes and links
    vvu-launch list                       the labs on this machine

A LAB is a lab name, a lab directory or a topology file (whose ``name`` is
used); with one lab on the machine it may be left out. Exit status: 0 ok,
1 failure (a check, a start), 2 usage or topology errors, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vvu_runtime.console import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    die,
    run_main,
    say,
    setup_logging,
)
from vvu_runtime.errors import VvuError
from vvu_runtime.launch.accel import Accelerator, AccelError, choose_accelerator, probe_kvm
from vvu_runtime.launch.appliance import ApplianceError, build_appliance
from vvu_runtime.launch.checks import SERIAL_MAX, CheckResult, LabAccess, run_checks
from vvu_runtime.launch.lab import (
    ImageFiles,
    LabError,
    LabPaths,
    default_state_dir,
    fs_export_dir,
    lab_lock,
    make_key,
    plan_lab,
    read_json,
    ssh_alias,
    write_access_files,
    write_json,
)
from vvu_runtime.launch.ports import port_free
from vvu_runtime.launch.procs import pid_alive, pid_mentions
from vvu_runtime.launch.shell import ShellError, SshShell
from vvu_runtime.launch.supervisor import remove_runtime
from vvu_runtime.launch.toolchain import Toolchain, ToolchainError
from vvu_runtime.launch.topology import (
    Accel,
    Topology,
    TopologyError,
    json_schema,
    load_topology,
    schema_text,
)

PROG = "vvu-launch"
EXIT_FAIL = EXIT_FAILURE


class LaunchError(VvuError):
    """A user-facing failure of a vvu-launch command."""


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header], *[[("-" if c is None else str(c)) for c in r]
                                         for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# --------------------------------------------------------------------------
# Finding labs
# --------------------------------------------------------------------------


def labs_root() -> Path:
    return default_state_dir() / "labs"


def known_labs() -> list[Path]:
    root = labs_root()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "topology.json").is_file())


def find_lab(ref: str | None) -> LabPaths:
    """A lab by name, directory or topology file; the only lab if ``ref`` is None."""
    if ref is None:
        labs = known_labs()
        if len(labs) == 1:
            return LabPaths.from_dir(labs[0])
        if not labs:
            raise LaunchError(f"no lab on this machine (under {labs_root()}): "
                              f"start one with `{PROG} up TOPOLOGY`")
        running = [p for p in labs
                   if supervisor_pid(LabPaths.from_dir(p), lab_state(LabPaths.from_dir(p)))]
        if len(running) == 1:
            return LabPaths.from_dir(running[0])
        names = ", ".join(p.name for p in labs)
        raise LaunchError(f"several labs ({names}), {len(running)} of them running: name one")
    p = Path(ref)
    if p.is_dir() and (p / "topology.json").is_file():
        return LabPaths.from_dir(p)
    if p.is_file():
        try:
            topo = load_topology(p)
        except TopologyError as e:
            raise LaunchError(f"{ref}: not a valid topology:\n{e}") from e
        paths = LabPaths.for_lab(topo.name, topo.options.lab_dir)
        if not paths.topology_json.is_file():
            raise LaunchError(f"lab {topo.name} (from {ref}) has never been brought up "
                              f"({paths.root})")
        return LabPaths.from_dir(paths.root)
    candidate = labs_root() / ref
    if (candidate / "topology.json").is_file():
        return LabPaths.from_dir(candidate)
    raise LaunchError(f"no lab {ref!r} (looked for a lab directory, a topology file and "
                      f"{candidate})")


def lab_state(paths: LabPaths) -> dict[str, Any]:
    try:
        return read_json(paths.state, what="the lab's state")
    except LabError:
        return {}


def supervisor_pid(paths: LabPaths, state: dict[str, Any]) -> int | None:
    """The lab's running supervisor, if any (checked against pid reuse)."""
    pid = state.get("supervisor", {}).get("pid")
    if pid and pid_alive(pid) and pid_mentions(pid, paths.root):
        return int(pid)
    return None


# --------------------------------------------------------------------------
# validate, render, schema, graph
# --------------------------------------------------------------------------


def load(path: Path) -> Topology:
    try:
        return load_topology(path)
    except TopologyError as e:
        print(str(e), file=sys.stderr)
        n = len(e.problems)
        die(f"{path}: {n} problem{'s' if n != 1 else ''}; nothing was started", EXIT_USAGE)


def cmd_validate(args: argparse.Namespace) -> int:
    topo = load(args.topology)
    links = sum(len(c.links) for c in topo.consumers)
    print(f"{args.topology}: lab {topo.name}: {len(topo.appliances)} appliance(s), "
          f"{len(topo.consumers)} consumer(s), {links} link(s), {len(topo.checks)} check(s): ok")
    tunnels = {frozenset((a.name, t.peer)) for a in topo.appliances for t in a.tunnels}
    for h in topo.hosts:
        names = ", ".join(n.name for n in topo.nodes_on(h.name)) or "nothing"
        print(f"  host {h.name} ({h.address or 'inventory ' + str(h.inventory)}): {names}")
    if tunnels:
        print(f"  {len(tunnels)} tunnel(s): "
              + ", ".join(" - ".join(sorted(t)) for t in sorted(tunnels, key=sorted)))
    return 0


def placed(topo: Topology, host: str | None) -> Topology:
    """The part of ``topo`` this machine runs: all of it, or ``host``'s slice."""
    if host is None:
        if topo.hosts:
            raise LaunchError(
                f"lab {topo.name} places its nodes on hosts "
                f"{', '.join(h.name for h in topo.hosts)}: give --host NAME (the host this "
                "machine is), or deploy the whole fleet with ansible/deploy.yml")
        return topo
    if not topo.hosts:
        raise LaunchError(f"--host {host}: the topology of lab {topo.name} has no hosts: "
                          "(leave --host out)")
    try:
        return topo.slice(host)
    except KeyError as e:
        raise LaunchError(str(e.args[0])) from None


def cmd_inventory(args: argparse.Namespace) -> int:
    from vvu_runtime.launch.fleet import fleet_inventory

    topo = load(args.topology)
    if not topo.hosts:
        raise LaunchError(f"{args.topology}: lab {topo.name} has no hosts: (everything runs "
                          f"on one machine: `{PROG} up` there)")
    text = fleet_inventory(topo)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        say(f"wrote {args.output}")
    return 0


def _accel(tc: Toolchain, want: Accel) -> tuple[Accelerator, str]:
    if want is Accel.TCG:
        return Accelerator.TCG, "asked for by the topology"
    if want is Accel.KVM:
        ok, why = probe_kvm(tc)
        if not ok:
            raise LaunchError(f"the topology asks for KVM, but KVM cannot run a guest here: {why}")
        return Accelerator.KVM, "asked for by the topology"
    choice = choose_accelerator(tc)
    return choice.accel, choice.reason


def image_kinds(topo: Topology) -> list[str]:
    kinds = {a.kind.value for a in topo.appliances}
    if any(c.image.kernel is None for c in topo.consumers):
        kinds.add("consumer")
    return sorted(kinds)


def _images(tc: Toolchain, topo: Topology, *, build: bool) -> dict[str, ImageFiles]:
    from vvu_runtime.launch.appliance import find_appliance

    images: dict[str, ImageFiles] = {}
    for kind in image_kinds(topo):
        if build:
            say(f"image {kind}: checking (builds only what changed)…")
            start = time.monotonic()
            img = build_appliance(tc, kind)
            if img.rebuilt:
                say(f"image {kind}: built in {time.monotonic() - start:.0f} s")
        else:
            try:
                found = find_appliance(tc, kind)
            except ApplianceError:
                found = None
            if found is None:
                out = tc.repo / "images"
                images[kind] = ImageFiles(kernel=out / f"vvu-{kind}.vmlinuz",
                                          initrd=out / f"vvu-{kind}.initrd",
                                          cmdline="(not built yet)",
                                          disk=out / f"vvu-{kind}.raw")
                continue
            img = found
        images[kind] = ImageFiles(kernel=img.kernel, initrd=img.initrd, cmdline=img.cmdline,
                                  disk=img.disk)
    return images


def _checks_json(topo: Topology) -> list[dict[str, Any]]:
    out = []
    for chk in topo.checks:
        params = dict(chk.params)
        if chk.kind.value == "disk":
            consumer = topo.consumer(params["node"])
            ref = str(params["disk"])
            for d in consumer.disks:
                if ref in (f"{d.storage}/{d.export}", d.export, str(d.index), d.link):
                    params["index"] = d.index
                    # How the check finds it in the guest: the n-th vhost-user virtio-blk
                    # disk, or the SCSI disk whose unit serial is the export's (the link).
                    params["protocol"] = d.protocol.value
                    params["position"] = sum(1 for x in consumer.disks[:d.index]
                                             if x.protocol is d.protocol)
                    params["serial"] = d.link[:SERIAL_MAX]
                    break
        if chk.kind.value == "fs":
            consumer = topo.consumer(params["node"])
            (mount,) = [m for m in consumer.fs if m.ref == params["fs"]]
            params.update(tag=mount.tag, mount=mount.mount, appliance=mount.appliance,
                          appliance_dir=fs_export_dir(mount.appliance, mount.export))
        out.append({"kind": chk.kind.value, "name": chk.describe(), "params": params})
    return out


def plan_for(topo: Topology, *, build: bool, paths: LabPaths | None = None,
             public_key: str = "ssh-ed25519 (made at up) vvu-lab",
             ports: dict[str, int] | None = None) -> Any:
    tc = Toolchain()
    accel, reason = _accel(tc, topo.options.accel)
    paths = paths or LabPaths.for_lab(topo.name, topo.options.lab_dir)
    return plan_lab(topo, paths, accel=accel, accel_reason=reason, public_key=public_key,
                    images=_images(tc, topo, build=build), ports=ports)


def cmd_render(args: argparse.Namespace) -> int:
    topo = placed(load(args.topology), args.host)
    plan = plan_for(topo, build=False)
    sys.stdout.write(plan.describe())
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(json_schema(), indent=2))
    else:
        sys.stdout.write(schema_text())
    return 0


def _graph(plan: dict[str, Any]) -> str:
    lines = ["graph LR"]
    for n in plan["nodes"]:
        shape = f'[["{n["name"]}<br/>{n["kind"]}"]]' if n["role"] == "appliance" else \
            f'("{n["name"]}")'
        lines.append(f"  {n['name'].replace('-', '_')}{shape}")
    for lk in plan["links"]:
        a, b = lk["consumer"].replace("-", "_"), lk["appliance"].replace("-", "_")
        lines.append(f"  {a} -- \"{lk['kind']}: {lk['name']}\" --- {b}")
    return "\n".join(lines)


def cmd_graph(args: argparse.Namespace) -> int:
    ref = args.lab
    if ref and Path(ref).is_file() and not _is_lab_file(Path(ref)):
        plan = plan_for(load(Path(ref)), build=False).to_json()
    else:
        plan = read_json(find_lab(ref).topology_json, what="the lab's resolved topology")
    print(_graph(plan))
    return 0


def _is_lab_file(path: Path) -> bool:
    return path.name == "topology.json"


# --------------------------------------------------------------------------
# up
# --------------------------------------------------------------------------


def _clean_leftovers(paths: LabPaths, quiet: bool = False) -> list[str]:
    """Stop whatever of the lab still runs and remove its runtime files (after a crash)."""
    done: list[str] = []
    state = lab_state(paths)
    plan: dict[str, Any] = {}
    with contextlib.suppress(LabError):
        plan = read_json(paths.topology_json, what="the lab's resolved topology")
    needle = paths.run
    pids: set[int] = set()
    for node in state.get("nodes", {}).values():
        for key in ("pid", "wrapper_pid", "devd_pid"):
            if node.get(key):
                pids.add(int(node[key]))
    # Anything else started for this lab (a half-started one leaves no record).
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            pids.add(int(proc.name))
    for pid in sorted(pids):
        if pid_alive(pid) and pid_mentions(pid, needle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                done.append(f"killed pid {pid}")
    deadline = time.monotonic() + 10
    while any(pid_alive(p) and pid_mentions(p, needle) for p in pids):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    had = [p for p in plan.get("ram_files", {}) if Path(p).exists()]
    if paths.run.exists() or had:
        remove_runtime(paths, plan)
        done.append(f"removed {paths.run} and {len(had)} RAM file(s)")
    if state and state.get("phase") not in ("stopped", "failed", None):
        state["phase"] = "stopped"
        for node in state.get("nodes", {}).values():
            node["state"] = "stopped"
        state["links"] = {}
        write_json(paths.state, state)
    # Temporary files of the mkosi wrappers just killed (Toolchain.scratch_dir); those
    # of any other finished mkosi go too, so they say nothing about this lab.
    with contextlib.suppress(OSError):
        Toolchain().collect_scratch()
    if done and not quiet:
        for d in done:
            say(d)
    return done


def _progress(paths: LabPaths, proc: subprocess.Popen[bytes], *, until: set[str],
              shown: dict[str, str], start: float) -> dict[str, Any]:
    """Follow state.json, printing a line per node state change, until the phase is in ``until``."""
    while True:
        state = lab_state(paths)
        for name, node in state.get("nodes", {}).items():
            st = node.get("state", "?")
            if shown.get(name) != st:
                shown[name] = st
                extra = ""
                if st == "booting" and node.get("pid"):
                    extra = f" (QEMU pid {node['pid']})"
                print(f"  {time.monotonic() - start:6.1f}s  {name:<16} {st}{extra}", flush=True)
        phase = state.get("phase")
        if phase in until:
            return state
        if proc.poll() is not None:
            return lab_state(paths)
        time.sleep(0.3)


def _stop_supervisor(paths: LabPaths, proc: subprocess.Popen[bytes] | None,
                     timeout: float = 120.0) -> None:
    state = lab_state(paths)
    pid = proc.pid if proc is not None else supervisor_pid(paths, state)
    if pid and pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            if proc is not None:
                proc.poll()
            time.sleep(0.2)
        if pid_alive(pid):
            say(f"supervisor {pid} did not stop in {timeout:.0f} s: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    _clean_leftovers(paths, quiet=True)


def _previous_ports(paths: LabPaths) -> dict[str, int]:
    """The SSH ports of the lab's last run that are still free: a lab brought up again
    keeps its ssh_config and inventory valid."""
    try:
        plan = read_json(paths.topology_json, what="the lab's resolved topology")
    except LabError:
        return {}
    return {n["name"]: n["ssh_port"] for n in plan.get("nodes", [])
            if n.get("ssh_port") and port_free(n["ssh_port"])}


def _stages(state: dict[str, Any], start: float, built_s: float) -> str:
    """Where the time of `up` went: images, appliances ready, consumers ready."""
    def last_ready(role: str) -> float | None:
        times = [n["ready_at"] for n in state.get("nodes", {}).values()
                 if n.get("role") == role and n.get("ready_at")]
        return max(times) if times else None

    parts = [f"images {built_s:.0f} s"]
    appliances = last_ready("appliance")
    consumers = last_ready("consumer")
    if appliances:
        parts.append(f"appliances ready {appliances - start:.0f} s")
    if consumers:
        parts.append(f"consumers ready {consumers - (appliances or start):.0f} s later")
    return ", ".join(parts)


def _live_table(paths: LabPaths, proc: subprocess.Popen[bytes], every: float = 5.0) -> None:
    """Redraw the status table in place (on a terminal) until the supervisor exits."""
    shown = 0
    while proc.poll() is None:
        time.sleep(every)
        if not sys.stdout.isatty():
            continue
        text = status_text(paths)
        if shown:
            sys.stdout.write(f"\x1b[{shown}F\x1b[J")
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        shown = text.count("\n") + 1


def _runtime_check(paths: LabPaths) -> dict[str, dict[str, Any]]:
    """Each appliance's installed vvu runtime against this checkout's (``runtime.json``)."""
    import vvu_runtime
    from vvu_runtime.appliance.wheel import source_digest

    want = source_digest(Path(vvu_runtime.__file__).parent)
    plan = read_json(paths.topology_json, what="the lab's resolved topology")
    access = LabAccess(plan, paths.key)
    out: dict[str, dict[str, Any]] = {}
    try:
        for n in plan["nodes"]:
            if n["role"] != "appliance":
                continue
            try:
                r = access.run(n["name"], "vvu-appliance-info --json", timeout=60)
                got = json.loads(r.stdout)
            except (ShellError, ValueError) as e:
                out[n["name"]] = {"error": str(e), "matches_checkout": False}
                continue
            got["matches_checkout"] = got.get("digest") == want and bool(got.get("verified"))
            out[n["name"]] = got
    finally:
        access.close()
    write_json(paths.root / "runtime.json", {"checkout_digest": want, "nodes": out})
    for name, info in out.items():
        if not info["matches_checkout"]:
            say(f"warning: {name} runs vvu-runtime {info.get('version')} "
                f"{str(info.get('digest'))[:12]}, not this checkout's {want[:12]} "
                f"({info.get('error') or 'rebuild the image: vvu-appliance build'})")
    return out


def _print_checks(results: Sequence[CheckResult]) -> None:
    rows = [[r.name, "pass" if r.ok else "FAIL", f"{r.seconds:.1f}s", r.detail]
            for r in results]
    print(table(["check", "result", "time", "detail"], rows), flush=True)


def _run_lab_checks(paths: LabPaths) -> list[CheckResult]:
    plan = read_json(paths.topology_json, what="the lab's resolved topology")
    checks = plan.get("checks", [])
    if not checks:
        return []
    return run_checks(LabAccess(plan, paths.key), checks)


def cmd_up(args: argparse.Namespace) -> int:
    topo = placed(load(args.topology), args.host)
    if not topo.nodes:
        say(f"host {args.host} runs no node of lab {topo.name}: nothing to start")
        return 0
    if args.name:
        topo = dataclasses.replace(topo, name=args.name)
    paths = LabPaths.for_lab(topo.name, args.lab_dir or topo.options.lab_dir)
    start = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    try:
        with lab_lock(paths):
            state = lab_state(paths)
            pid = supervisor_pid(paths, state)
            if pid is not None:
                say(f"lab {topo.name} is already {state.get('phase', 'running')} "
                    f"(supervisor pid {pid}); nothing changed. `{PROG} status {topo.name}` "
                    f"shows it, `{PROG} down {topo.name}` stops it")
                return 0
            if _clean_leftovers(paths, quiet=True):
                say(f"lab {topo.name}: removed what a previous run left behind")
            for d in ("logs", "disks"):
                (paths.root / d).mkdir(parents=True, exist_ok=True)
            public_key = make_key(paths)
            built = time.monotonic()
            plan = plan_for(topo, build=True, paths=paths, public_key=public_key,
                            ports=_previous_ports(paths))
            built_s = time.monotonic() - built
            start_wall = time.time()
            data = plan.to_json()
            data["checks"] = _checks_json(topo)
            shutil.copyfile(topo.source, paths.topology_yaml)
            write_json(paths.topology_json, data)
            paths.state.unlink(missing_ok=True)
            write_access_files(plan)
            say(f"lab {topo.name}: {len(plan.appliances)} appliance(s), {len(plan.consumers)} "
                f"consumer(s), {len(plan.links)} link(s) on {plan.accel.value} "
                f"({plan.accel_reason}); lab directory {paths.root}")
            argv = [sys.executable, "-m", "vvu_runtime.launch.supervisor", str(paths.root)]
            if not args.detach:
                argv += ["--owner", str(os.getpid())]
            with paths.supervisor_log.open("ab") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
            shown: dict[str, str] = {}
            state = _progress(paths, proc, until={"running", "failed", "stopped"}, shown=shown,
                              start=start)
            if state.get("phase") != "running":
                err = state.get("error") or "the supervisor exited"
                _stop_supervisor(paths, proc)
                raise LaunchError(f"lab {topo.name} did not start: {err}\n"
                                  f"(supervisor log: {paths.supervisor_log})")
        up_s = time.monotonic() - start
        say(f"lab {topo.name} is up in {up_s:.0f} s ({_stages(state, start_wall, built_s)})")
        code = 0
        _runtime_check(paths)
        if not args.no_check:
            results = _run_lab_checks(paths)
            if results:
                _print_checks(results)
                failed = [r for r in results if not r.ok]
                say(f"checks: {len(results) - len(failed)} passed, {len(failed)} failed "
                    f"({time.monotonic() - start:.0f} s after up)")
                code = EXIT_FAIL if failed else 0
        print(status_text(paths), flush=True)
        hints = (f"\n  {PROG} ssh --lab {topo.name} NODE      log in to a node\n"
                 f"  {PROG} status {topo.name}            this table again (--json)\n"
                 f"  {PROG} down {topo.name}              stop the lab")
        if args.detach:
            print(hints, flush=True)
            return code
        print(hints.replace(f"  {PROG} down {topo.name}              stop the lab",
                            "  Ctrl-C                             stop the lab"), flush=True)
        assert proc is not None
        _live_table(paths, proc)
        say(f"lab {topo.name}: supervisor exited ({proc.returncode})")
        _clean_leftovers(paths, quiet=True)
        return EXIT_FAIL
    except KeyboardInterrupt:
        say(f"interrupted: stopping lab {topo.name}…")
        _stop_supervisor(paths, proc)
        say(f"lab {topo.name} stopped")
        return EXIT_INTERRUPTED
    except BaseException:
        if proc is not None:
            _stop_supervisor(paths, proc)
        raise


# --------------------------------------------------------------------------
# down, status, check, logs, ssh, list
# --------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    paths = find_lab(args.lab)
    with lab_lock(paths):
        state = lab_state(paths)
        pid = supervisor_pid(paths, state)
        if pid is not None:
            say(f"stopping lab {paths.name} (supervisor pid {pid})…")
            _stop_supervisor(paths, None)
            with contextlib.suppress(OSError):
                Toolchain().collect_scratch()
        else:
            if _clean_leftovers(paths):
                say(f"lab {paths.name} was not running cleanly: its leftovers are removed")
        say(f"lab {paths.name} is down")
    if args.cleanup:
        shutil.rmtree(paths.root, ignore_errors=True)
        say(f"removed {paths.root}")
    return 0


def lab_status(paths: LabPaths) -> dict[str, Any]:
    """The lab as ``status --json`` shows it."""
    plan = read_json(paths.topology_json, what="the lab's resolved topology")
    state = lab_state(paths)
    running = supervisor_pid(paths, state) is not None
    phase = state.get("phase", "never started")
    if not running and phase in ("starting", "running", "stopping"):
        phase = "crashed (supervisor gone; `vvu-launch down` cleans up)"
    now = time.time()
    nodes = []
    for n in plan["nodes"]:
        st = state.get("nodes", {}).get(n["name"], {})
        alive = running and pid_alive(st.get("pid"))
        node_state = st.get("state", "stopped") if running else "stopped"
        if running and node_state == "ready" and not alive:
            node_state = "dead"
        nodes.append({
            "name": n["name"], "role": n["role"], "kind": n["kind"], "state": node_state,
            "accel": plan["accel"], "pid": st.get("pid") if running else None,
            "devd_pid": st.get("devd_pid") if running else None,
            "uptime": (now - st["started_at"]) if running and st.get("started_at") else None,
            "restarts": st.get("restarts", 0), "ssh_port": n["ssh_port"],
            "error": st.get("error"),
            "log": str(paths.console_log(n["name"])),
        })
    runtime: dict[str, Any] = {}
    with contextlib.suppress(LabError):
        runtime = read_json(paths.root / "runtime.json", what="runtime versions")["nodes"]
    for node in nodes:
        info = runtime.get(node["name"])
        node["runtime"] = None if info is None else {
            "version": info.get("version"), "digest": info.get("digest"),
            "matches_checkout": info.get("matches_checkout")}
    links = []
    rows = state.get("links", {}) if running else {}
    # Fresher than state.json: vvu-devd's own status files.
    if running:
        for n in plan["nodes"]:
            if n.get("devd_status"):
                with contextlib.suppress(OSError, ValueError):
                    for row in json.loads(Path(n["devd_status"]).read_text()).get("devices", []):
                        rows[row["device"]] = row
    for lk in plan["links"]:
        row = rows.get(lk["name"], {})
        links.append({
            "name": lk["name"], "kind": lk["kind"], "consumer": lk["consumer"],
            "appliance": lk["appliance"],
            "session": row.get("consumer", "down"), "vfio_user": row.get("appliance", "down"),
            "status": row.get("status", "down"),
            "messages": sum(int(row.get(k, 0)) for k in ("rx msgs", "tx replies", "tx reqs")),
            "kicks": int(row.get("kicks", 0)), "doorbells": int(row.get("doorbells", 0)),
            "errors": int(row.get("errors", 0)), "resets": int(row.get("resets", 0)),
        })
    _mark_degraded(nodes, links)
    return {"name": paths.name, "host": plan.get("topology", {}).get("sliced_for"),
            "lab_dir": str(paths.root), "phase": phase,
            "accel": plan["accel"], "accel_reason": plan["accel_reason"],
            "supervisor_pid": state.get("supervisor", {}).get("pid") if running else None,
            "error": state.get("error"), "nodes": nodes, "links": links}


def _mark_degraded(nodes: list[dict[str, Any]], links: list[dict[str, Any]]) -> None:
    """A booted node whose links do not serve is "degraded", not "ready": the
    supervisor's state says the VM runs, the links say whether its devices work (an
    appliance's back-end unit failed, a consumer not reconnected yet)."""
    for node in nodes:
        if node["state"] != "ready":
            continue
        if node["role"] == "appliance":
            bad = [f"link {lk['name']}: the appliance's back-end is not up"
                   for lk in links if lk["appliance"] == node["name"]
                   and "BACKEND_UP" not in lk["status"]]
        else:
            bad = [f"link {lk['name']}: not connected to {lk['appliance']}"
                   for lk in links if lk["consumer"] == node["name"]
                   and "FRONTEND_UP" not in lk["status"]]
        if bad:
            node["state"] = "degraded"
            node["error"] = "; ".join(bad)


def status_text(paths: LabPaths) -> str:
    st = lab_status(paths)
    out = [f"lab {st['name']}: {st['phase']} on {st['accel']} ({st['accel_reason']}); "
           f"{st['lab_dir']}"]
    if st["error"]:
        out.append(f"error: {st['error']}")
    def runtime(n: dict[str, Any]) -> str:
        r = n.get("runtime")
        if not r:
            return "-"
        return f"{r['version']} " + ("(this checkout)" if r["matches_checkout"] else "(OTHER)")

    out.append(table(
        ["node", "role", "kind", "state", "accel", "pid", "uptime", "restarts", "ssh",
         "vvu runtime"],
        [[n["name"], n["role"], n["kind"], n["state"], n["accel"], n["pid"],
          _duration(n["uptime"]), n["restarts"], n["ssh_port"], runtime(n)]
         for n in st["nodes"]]))
    if st["links"]:
        out.append("")
        out.append(table(
            ["link", "type", "consumer", "appliance", "vhost-user", "VVU status", "msgs",
             "kicks", "doorbells", "errors"],
            [[lk["name"], lk["kind"], lk["consumer"], lk["appliance"], lk["session"],
              lk["status"], lk["messages"], lk["kicks"], lk["doorbells"], lk["errors"]]
             for lk in st["links"]]))
    for n in st["nodes"]:
        if n["state"] == "degraded":
            out.append(f"\n{n['name']}: {n['error']}")
        elif n["error"] and n["state"] != "ready":
            out.append(f"\n{n['name']}: {n['error']}")
            out.append(_tail_file(Path(n["log"]), 600))
    return "\n".join(out)


def _tail_file(path: Path, chars: int) -> str:
    with contextlib.suppress(OSError):
        data = path.read_bytes()[-chars:]
        return data.decode(errors="replace")
    return ""


def cmd_status(args: argparse.Namespace) -> int:
    paths = find_lab(args.lab)
    if args.json:
        print(json.dumps(lab_status(paths), indent=2))
    else:
        print(status_text(paths))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    paths = find_lab(args.lab)
    if supervisor_pid(paths, lab_state(paths)) is None:
        raise LaunchError(f"lab {paths.name} is not running")
    results = _run_lab_checks(paths)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        _print_checks(results) if results else print("no checks in this topology")
    return EXIT_FAIL if any(not r.ok for r in results) else 0


def cmd_logs(args: argparse.Namespace) -> int:
    paths = find_lab(args.lab)
    plan = read_json(paths.topology_json, what="the lab's resolved topology")
    names = [n["name"] for n in plan["nodes"]]
    if args.node == "supervisor":
        path = paths.supervisor_log
    elif args.node not in names:
        raise LaunchError(f"lab {paths.name} has no node {args.node!r} (nodes: "
                          f"{', '.join(names)}, supervisor)")
    elif args.devd:
        path = paths.devd_log(args.node)
    elif args.qemu:
        path = paths.qemu_log(args.node)
    else:
        path = paths.console_log(args.node)
    if not path.exists():
        raise LaunchError(f"no log yet: {path}")
    with path.open("rb") as f:
        sys.stdout.buffer.write(f.read())
        sys.stdout.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.3)
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    paths = find_lab(args.lab)
    plan = read_json(paths.topology_json, what="the lab's resolved topology")
    node = next((n for n in plan["nodes"] if n["name"] == args.node), None)
    if node is None:
        raise LaunchError(f"lab {paths.name} has no node {args.node!r}")
    if node["ssh_port"] is None:
        raise LaunchError(f"{args.node} has no sshd (a busybox initramfs guest): its console is "
                          f"{node['console_socket']}")
    command = [c for c in args.command if c != "--"]
    if not command:
        ssh = shutil.which("ssh")
        if ssh is None:
            raise LaunchError("no ssh client on this host: give a command to run it through "
                              "fabric instead")
        os.execv(ssh, ["ssh", "-F", str(paths.ssh_config), ssh_alias(paths.name, args.node)])
    shell = SshShell(args.node, node["ssh_port"], paths.key)
    try:
        r = shell.run(" ".join(command), timeout=args.timeout)
    finally:
        shell.close()
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.status


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for root in known_labs():
        paths = LabPaths.from_dir(root)
        st = lab_status(paths)
        ready = sum(1 for n in st["nodes"] if n["state"] == "ready")
        rows.append([st["name"], st["phase"], f"{ready}/{len(st['nodes'])}", st["lab_dir"]])
    print(table(["lab", "phase", "ready", "directory"], rows) if rows else "no labs")
    return 0


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def _topology_help() -> str:
    """The topology file's top-level fields, from the schema table itself."""
    from vvu_runtime.launch.topology.schema import TOPOLOGY

    width = max(len(f.name) for f in TOPOLOGY.fields)
    rows = [f"  {f.name.ljust(width)}  {f.help}" for f in TOPOLOGY.fields]
    return ("topology file fields (`vvu-launch schema` documents them all):\n"
            + "\n".join(rows))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Wire consumer VMs to vvu appliance VMs: run, check, watch and "
        "tear down labs described by a topology file.",
        epilog=f"`{PROG} schema` documents the topology file; examples/ has some.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def topo_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("topology", type=Path, metavar="TOPOLOGY", help="topology YAML file")
        sp.formatter_class = argparse.RawDescriptionHelpFormatter
        sp.epilog = _topology_help()

    s = sub.add_parser("validate", help="check a topology file; start nothing")
    topo_arg(s)
    s = sub.add_parser("render", help="print every command line (QEMU, vvu-devd, files)")
    topo_arg(s)
    s.add_argument("--host", metavar="NAME", help="only the slice of host NAME (hosts:)")
    s = sub.add_parser("schema", help="document the topology file's fields")
    s.add_argument("--json", action="store_true", help="the JSON Schema (for editors)")
    s = sub.add_parser("up", help="bring a lab up, run its checks, show its status")
    topo_arg(s)
    s.add_argument("--detach", "-d", action="store_true",
                   help="return once the lab is up (a supervisor keeps running it)")
    s.add_argument("--no-check", action="store_true", help="do not run the topology's checks")
    s.add_argument("--name", help="lab name instead of the topology's (a second copy of a lab)")
    s.add_argument("--lab-dir", type=Path, help="lab directory instead of the default")
    s.add_argument("--host", metavar="NAME",
                   help="bring up only the nodes placed on host NAME (hosts:); the other "
                   "hosts run their own slices")
    s = sub.add_parser("inventory", help="the Ansible inventory of the topology's hosts "
                       "(for ansible/*.yml)")
    topo_arg(s)
    s.add_argument("--output", "-o", type=Path, metavar="FILE", help="write it here")
    s = sub.add_parser("down", help="stop a lab (from its recorded state)")
    s.add_argument("lab", nargs="?", metavar="LAB")
    s.add_argument("--cleanup", action="store_true",
                   help="also remove the lab directory (data disks, logs, keys)")
    s = sub.add_parser("status", help="nodes and links of a lab")
    s.add_argument("lab", nargs="?", metavar="LAB")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("check", help="run the topology's checks against the running lab")
    s.add_argument("lab", nargs="?", metavar="LAB")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("logs", help="a node's console log (or --qemu, --devd; or 'supervisor')")
    s.add_argument("--lab", "-l", metavar="LAB")
    s.add_argument("node", metavar="NODE")
    s.add_argument("--follow", "-f", action="store_true")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--qemu", action="store_true", help="QEMU's own output")
    g.add_argument("--devd", action="store_true", help="the appliance's vvu-devd")
    s = sub.add_parser("ssh", help="log in to a node, or run a command there")
    s.add_argument("--lab", "-l", metavar="LAB")
    s.add_argument("--timeout", type=float, default=600.0, help="for a command (s)")
    s.add_argument("node", metavar="NODE")
    s.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    s = sub.add_parser("graph", help="Mermaid text of nodes and links")
    s.add_argument("lab", nargs="?", metavar="LAB|TOPOLOGY")
    sub.add_parser("list", help="the labs on this machine")
    return p


COMMANDS = {
    "validate": cmd_validate, "render": cmd_render, "schema": cmd_schema, "up": cmd_up,
    "down": cmd_down, "status": cmd_status, "check": cmd_check, "logs": cmd_logs,
    "ssh": cmd_ssh, "graph": cmd_graph, "list": cmd_list, "inventory": cmd_inventory,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(PROG, "WARNING")
    # SIGTERM unwinds like Ctrl-C: `up` stops what it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    def body() -> int:
        try:
            return COMMANDS[args.cmd](args)
        except BrokenPipeError:
            return 0

    return run_main(body, program=PROG,
                    errors=(LabError, ToolchainError, ApplianceError, AccelError, ShellError))


if __name__ == "__main__":
    sys.exit(main())
