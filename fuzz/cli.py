"""``python -m fuzz [HARNESS ...] (--cases N | --seconds S) [--seed N] [--json]``.

Runs each harness for the budget and prints one line per harness (cases,
cases/s, findings, hangs). Exits 1 if anything was found, saving each finding's
input under ``--findings DIR``. ``python -m fuzz HARNESS --replay FILE`` runs one
saved input again and prints what it does.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from fuzz.engine import Budget, Runner, RunResult, watching_logs
from fuzz.harnesses import HARNESSES

DEFAULT_FINDINGS = Path("fuzz-findings")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("harnesses", nargs="*", metavar="HARNESS",
                   help=f"which to run (default: all of {', '.join(HARNESSES)})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--cases", type=int, help="cases per harness")
    budget.add_argument("--seconds", type=float, help="seconds per harness")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--case-timeout", type=float, default=5.0,
                   help="seconds after which a case counts as a hang (default 5)")
    p.add_argument("--findings", type=Path, default=DEFAULT_FINDINGS,
                   help=f"where findings' inputs are saved (default {DEFAULT_FINDINGS})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--replay", type=Path, metavar="FILE",
                   help="run one saved input through the (one) named harness")
    return p


def table(results: list[RunResult]) -> str:
    rows = [("harness", "cases", "cases/s", "findings", "hangs", "seconds", "depth")]
    for r in results:
        rows.append((r.harness, f"{r.cases}", f"{r.rate:.0f}", f"{r.crashes}", f"{r.hangs}",
                     f"{r.seconds:.1f}", f"{r.max_depth}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    for r in results:
        for f in r.findings.values():
            where = f" -> {f.path}" if f.path else ""
            lines.append(f"  {r.harness}: {f.count} x {f.signature}{where}")
    return "\n".join(lines)


def replay(name: str, path: Path) -> int:
    harness = HARNESSES[name]()
    data = path.read_bytes()
    with watching_logs() as watch:
        harness.watch = watch
        harness.open()
        try:
            depth = harness.run_one(data)
            print(f"{name}: {path}: returned depth {depth}")
            status = 0
        except harness.expected as exc:
            print(f"{name}: {path}: refused as expected: {type(exc).__name__}: {exc}")
            status = 0
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            harness.close()
        for text in watch.take():
            print(f"logged with a traceback:\n{text}")
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = args.harnesses or list(HARNESSES)
    unknown = [n for n in names if n not in HARNESSES]
    if unknown:
        print(f"python -m fuzz: error: unknown harness {', '.join(unknown)} "
              f"(known: {', '.join(HARNESSES)})", file=sys.stderr)
        return 2
    if args.replay is not None:
        if len(names) != 1:
            print("python -m fuzz: error: --replay needs exactly one harness", file=sys.stderr)
            return 2
        return replay(names[0], args.replay)
    if args.cases is None and args.seconds is None:
        args.cases = 10_000
    budget = Budget(cases=args.cases, seconds=args.seconds)
    results = []
    for name in names:
        runner = Runner(HARNESSES[name](), seed=args.seed, case_timeout=args.case_timeout,
                        findings_dir=args.findings)
        results.append(runner.run(budget))
        # progress on stderr, one row per finished harness (the table or JSON follows)
        print(table(results[-1:]).splitlines()[1], file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print(table(results))
        if any(r.findings for r in results):
            print(f"findings saved under {args.findings}/ (replay: python -m fuzz HARNESS "
                  "--replay FILE)")
    return 1 if any(r.findings for r in results) else 0
