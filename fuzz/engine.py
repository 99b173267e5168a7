"""The fuzz engine: generate inputs, run one harness case at a time, classify outcomes.

Coverage-guided engines (atheris) need an instrumented interpreter and a libFuzzer
main loop that never returns; this one is plain Python, deterministic for a seed,
and runs inside the test suite. Its feedback is the *depth* a harness reports for
each case (how far the input got: messages accepted, chains walked...): an input
that reaches a depth not seen before joins the corpus, and later inputs are
mutations of corpus entries or fresh random bytes.

A case ends in one of:

* fine: it returned, or raised one of the harness's ``expected`` errors (the
  layer's own error tree: bad input refused with a clear message);
* a finding: any other exception, an error the code under test logged with a
  traceback (its "internal error" paths), or fds left open after the case;
* a hang: it ran past ``case_timeout`` (SIGALRM interrupts it).

Findings are grouped by a signature (kind and where it was raised); the first
input of each group is saved under ``findings_dir`` with a ``.txt`` beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import random
import signal
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

from vvu_runtime.errors import VvuError

#: Inputs longer than this are cut (harnesses read a few hundred bytes at most).
MAX_INPUT = 4096
#: Distinct depths kept in the corpus.
MAX_CORPUS = 512


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case that ran too long (BaseException: code under
    test that catches Exception must not swallow it)."""


class Finding(Exception):
    """Raised by a harness when the code under test misbehaved without raising
    (a broken invariant, a logged internal error, a leaked fd)."""


class LogWatch(logging.Handler):
    """Collects records logged with a traceback under ``vvu_runtime``: the code's own
    "internal error" paths (``log.exception``), which mean an exception escaped the
    layer's error tree even though the process survived."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
            self.records.append(f"{record.getMessage()}\n{text}")

    def take(self) -> list[str]:
        out, self.records = self.records, []
        return out


@contextlib.contextmanager
def watching_logs() -> Iterator[LogWatch]:
    """Route ``vvu_runtime`` logging to a :class:`LogWatch` only, for the run."""
    logger = logging.getLogger("vvu_runtime")
    watch = LogWatch()
    saved = logger.level, logger.propagate
    logger.addHandler(watch)
    logger.setLevel(logging.ERROR)
    logger.propagate = False  # refusals are expected; don't flood the console
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class Harness(ABC):
    """One fuzz target. ``open`` builds what all cases share (its fds are the
    baseline of the leak check), ``run_one`` runs one case and returns its depth,
    ``close`` releases everything."""

    name: str = ""
    doc: str = ""
    #: Errors that mean "input refused properly".
    expected: tuple[type[BaseException], ...] = (VvuError,)
    #: Check fds after every case (else every ``LEAK_CHECK_EVERY`` cases).
    checks_fds_each_case: bool = True
    #: Log records with a traceback seen during a case: set by the engine.
    watch: LogWatch | None = None

    def open(self) -> None:  # noqa: B027 - optional hook
        """Build shared state."""

    @abstractmethod
    def run_one(self, data: bytes) -> int:
        """Run one case; return how deep it got (a small int)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release shared state."""

    def seeds(self) -> list[bytes]:
        """Starting inputs for the corpus."""
        return [b"", bytes(64)]

    def take_logged(self) -> list[str]:
        return self.watch.take() if self.watch is not None else []


LEAK_CHECK_EVERY = 1024


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> set[int]:
    """The process's open fds (without the one listing /proc/self/fd used)."""
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd)}


def describe_fds(fds: set[int]) -> str:
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(f"{fd} (gone)")
    return ", ".join(out)


@dataclass
class FindingRecord:
    kind: str            # "crash", "hang", "leak", "logged"
    signature: str
    detail: str
    data: bytes
    count: int = 1
    path: Path | None = None


@dataclass
class RunResult:
    harness: str
    cases: int = 0
    seconds: float = 0.0
    expected_errors: int = 0
    max_depth: int = 0
    corpus: int = 0
    findings: dict[str, FindingRecord] = field(default_factory=dict)

    @property
    def hangs(self) -> int:
        return sum(f.count for f in self.findings.values() if f.kind == "hang")

    @property
    def crashes(self) -> int:
        return sum(f.count for f in self.findings.values() if f.kind != "hang")

    @property
    def rate(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "harness": self.harness, "cases": self.cases, "seconds": round(self.seconds, 3),
            "cases_per_second": round(self.rate, 1), "expected_errors": self.expected_errors,
            "findings": self.crashes, "hangs": self.hangs, "max_depth": self.max_depth,
            "corpus": self.corpus,
            "finding_files": [str(f.path) for f in self.findings.values() if f.path],
            "signatures": {k: {"kind": f.kind, "count": f.count}
                           for k, f in self.findings.items()},
        }


def _signature(kind: str, exc: BaseException | None, text: str) -> str:
    """Where a problem came from: the innermost frame in our code, and the type."""
    if exc is None:
        return f"{kind}: {text.splitlines()[0][:120] if text else ''}"
    where = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        path = frame.f_code.co_filename
        if "vvu_runtime" in path or "/fuzz/" in path:
            where = f"{Path(path).name}:{lineno}"
    return f"{kind}: {type(exc).__name__} at {where}"


def _logged_signature(text: str) -> str:
    """The last traceback line and the innermost frame of a logged traceback."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    where = ""
    for ln in lines:
        if ln.startswith("File ") and ("vvu_runtime" in ln or "/fuzz/" in ln):
            path, _, rest = ln[6:].partition('", line ')
            where = f"{Path(path).name}:{rest.split(',')[0]}"
    kind = lines[-1].split(":")[0] if lines else ""
    return f"logged: {kind} at {where}"


class _Alarm:
    """Per-case time limit with SIGALRM (main thread only)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._saved: object = None
        self._outer = (0.0, 0.0)
        self._entered = 0.0

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        raise CaseTimeout(f"case ran longer than {self.seconds} s")

    def __enter__(self) -> _Alarm:
        # Someone else's timer (pytest-timeout uses SIGALRM too) is put back on exit.
        self._outer = signal.getitimer(signal.ITIMER_REAL)
        self._entered = time.monotonic()
        self._saved = signal.signal(signal.SIGALRM, self._fire)
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._saved)  # type: ignore[arg-type]
        left, interval = self._outer
        if left:
            left = max(left - (time.monotonic() - self._entered), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, interval)

    def arm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)


_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0xFE, 0x10, 0x40)


class Mutator:
    """Fresh inputs and mutations of corpus entries, from one seeded generator."""

    def __init__(self, seed: int, seeds: list[bytes]) -> None:
        self.rng = random.Random(seed)
        self.corpus: dict[int, bytes] = {}
        self._pool: list[bytes] = [s[:MAX_INPUT] for s in seeds] or [b""]
        self._unrun = list(reversed(self._pool))  # every seed runs once as it is, first

    def add(self, depth: int, data: bytes) -> None:
        if depth not in self.corpus and len(self.corpus) < MAX_CORPUS:
            self.corpus[depth] = data
            self._pool.append(data)
        elif depth in self.corpus and self.rng.random() < 0.05:
            # refresh: keep some variety among inputs of the same depth
            self.corpus[depth] = data
            self._pool[self.rng.randrange(len(self._pool))] = data

    def next(self) -> bytes:
        if self._unrun:
            return self._unrun.pop()
        rng = self.rng
        if rng.random() < 0.25:
            return rng.randbytes(rng.choice((8, 32, 64, 128, 256, 512, 1024)))
        data = bytearray(rng.choice(self._pool))
        for _ in range(rng.choice((1, 1, 2, 4, 8))):
            self._mutate(data)
        return bytes(data[:MAX_INPUT])

    def _mutate(self, data: bytearray) -> None:
        rng = self.rng
        op = rng.randrange(7)
        n = len(data)
        if n == 0 or op == 0:  # append fresh bytes
            data += rng.randbytes(rng.choice((1, 4, 16, 64)))
        elif op == 1:
            data[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 2:
            data[rng.randrange(n)] = rng.choice(_INTERESTING)
        elif op == 3:
            data[rng.randrange(n)] = rng.randrange(256)
        elif op == 4:  # cut a range
            i = rng.randrange(n)
            del data[i:i + rng.choice((1, 2, 4, 16))]
        elif op == 5:  # duplicate a range
            i = rng.randrange(n)
            data[i:i] = data[i:i + rng.choice((1, 4, 16, 64))]
        else:  # splice with another corpus entry
            other = rng.choice(self._pool)
            if other:
                i = rng.randrange(len(other))
                j = rng.randrange(n)
                data[j:] = other[i:]


@dataclass
class Budget:
    cases: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.cases is None and self.seconds is None:
            raise ValueError("a fuzz budget needs a case count or a time")


class Runner:
    """Runs one harness for a budget."""

    def __init__(self, harness: Harness, *, seed: int = 0, case_timeout: float = 5.0,
                 findings_dir: Path | None = None) -> None:
        self.harness = harness
        self.seed = seed
        self.case_timeout = case_timeout
        self.findings_dir = findings_dir
        self.result = RunResult(harness.name)

    def run(self, budget: Budget) -> RunResult:
        harness = self.harness
        mutator = Mutator(self.seed, harness.seeds())
        with watching_logs() as watch, _Alarm(self.case_timeout) as alarm:
            harness.watch = watch
            harness.open()
            try:
                self._loop(budget, mutator, alarm)
            finally:
                harness.close()
                harness.watch = None
        self.result.corpus = len(mutator.corpus)
        return self.result

    def _loop(self, budget: Budget, mutator: Mutator, alarm: _Alarm) -> None:
        harness, result = self.harness, self.result
        gc.collect()
        baseline = open_fds()
        each = harness.checks_fds_each_case
        max_cases = budget.cases if budget.cases is not None else 1 << 62
        deadline = (time.monotonic() + budget.seconds if budget.seconds is not None
                    else float("inf"))
        start = time.monotonic()
        cases = 0
        expected = harness.expected
        while cases < max_cases:
            if cases & 63 == 0 and time.monotonic() >= deadline:
                break
            data = mutator.next()
            cases += 1
            depth = self.run_case(data, alarm, expected)
            if depth >= 0:
                if depth > result.max_depth:
                    result.max_depth = depth
                mutator.add(depth, data)
            if each or cases % LEAK_CHECK_EVERY == 0:
                now = open_fds()
                if now != baseline:
                    # Objects of earlier code (other tests in the same process) close
                    # their fds when collected: only fds that stay open count.
                    if now - baseline:
                        gc.collect()
                        now = open_fds()
                    if now - baseline:
                        self.record("leak", None,
                                    f"fds left open: {describe_fds(now - baseline)}", data)
                    baseline = now
        result.cases = cases
        result.seconds = time.monotonic() - start

    def run_case(self, data: bytes, alarm: _Alarm,
                 expected: tuple[type[BaseException], ...]) -> int:
        """One case; returns its depth, or -1 after an expected error or a finding."""
        depth = -1
        alarm.arm()
        try:
            depth = self.harness.run_one(data)
        except CaseTimeout as exc:
            alarm.disarm()
            self.record("hang", exc, str(exc), data)
        except expected:
            alarm.disarm()
            self.result.expected_errors += 1
        except Finding as exc:
            alarm.disarm()
            self.record("finding", exc, str(exc), data)
        except Exception as exc:
            alarm.disarm()
            self.record("crash", exc, "".join(traceback.format_exception(exc)), data)
        else:
            alarm.disarm()
        for text in self.harness.take_logged():
            self.record("logged", None, text, data)
            depth = -1
        return depth

    def record(self, kind: str, exc: BaseException | None, detail: str, data: bytes) -> None:
        if isinstance(exc, Finding):
            sig = f"{kind}: {str(exc).splitlines()[0][:160]}"
        elif kind == "logged":
            sig = _logged_signature(detail)
        elif kind == "leak":
            kinds = {d.split(" -> ")[-1].split(":")[0]
                     for d in detail[len("fds left open: "):].split(", ")}
            sig = "leak: " + ", ".join(sorted(kinds))
        else:
            sig = _signature(kind, exc, detail)
        if exc is not None and kind in ("hang", "finding"):
            detail = detail + "\n" + "".join(traceback.format_exception(exc))
        known = self.result.findings.get(sig)
        if known is not None:
            known.count += 1
            return
        rec = FindingRecord(kind, sig, detail, data)
        self.result.findings[sig] = rec
        if self.findings_dir is not None:
            self.findings_dir.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha1(data).hexdigest()[:12]
            path = self.findings_dir / f"{self.harness.name}-{kind}-{digest}"
            path.write_bytes(data)
            path.with_suffix(".txt").write_text(f"{sig}\n\n{detail}\n")
            rec.path = path


def run_loop_once(loop: asyncio.AbstractEventLoop) -> None:
    """Run the callbacks that are ready now (and fds that are readable now) once."""
    loop.call_soon(loop.stop)
    loop.run_forever()
