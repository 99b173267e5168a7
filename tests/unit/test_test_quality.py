"""Tests that cannot fail are bugs: every test file under tests/ (and soak/) is parsed
with ``ast`` and checked for assertions that hold whatever the code does, and for test
functions that check nothing.

Flagged:

* ``assert X or True`` (any ``or`` with a truthy constant), ``assert True``, a truthy
  literal (``assert "x"``, ``assert (a, b)``: a non-empty tuple is always true);
* ``assert X == X`` (the same expression on both sides of ``==``, ``<=``, ``>=``, ``is``);
* a value that cannot be negative compared ``>= 0`` (or ``0 <=``) with no other bound:
  ``len()``, ``abs()``, and any function or method whose every ``return`` is a ``len()``
  (such as ``Switch.age``, found by reading vvu_runtime and tests);
* a ``test_*`` function with no ``assert``, no ``raise``, no ``pytest.raises``/``fail``/
  ``warns`` and no call to a checking helper. A checking helper is a function in
  tests/ or soak/ that does one of these itself (found to a fixpoint, so helpers of
  helpers count), or a call that fails by contract: ``check_output``/``check_call``,
  ``subprocess.run(..., check=True)``, a console's ``check``. A fuzz test whose claim
  is "raises nothing but E" (``with contextlib.suppress(E)``) checks that claim: any
  other exception fails it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("tests", "soak")
#: Calls that raise when what they check does not hold.
CHECKING_CALLS = frozenset({"check_output", "check_call", "check", "fail", "raises", "warns",
                            "deprecated_call", "suppress"})


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _called_name(call: ast.Call) -> str | None:
    f = call.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute):
        return f.attr
    return None


def _truthy_literal(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return bool(node.value)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts)
    if isinstance(node, ast.Dict):
        return bool(node.keys)
    if isinstance(node, ast.JoinedStr):  # an f-string with literal text is never empty
        return any(isinstance(v, ast.Constant) and v.value for v in node.values)
    return False


def count_functions(trees: Iterable[ast.Module]) -> frozenset[str]:
    """Names of functions whose every ``return`` returns ``len(...)``: counts."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            returns = [n.value for n in _own_nodes(node) if isinstance(n, ast.Return)]
            if returns and all(isinstance(r, ast.Call) and isinstance(r.func, ast.Name)
                               and r.func.id == "len" for r in returns):
                names.add(node.name)
    return frozenset(names | {"len", "abs"})


def _own_nodes(func: ast.AST) -> Iterator[ast.AST]:
    """The nodes of ``func``'s body, not descending into nested functions or classes."""
    todo = list(ast.iter_child_nodes(func))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                 ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def _non_negative(node: ast.expr, counts: frozenset[str]) -> bool:
    return isinstance(node, ast.Call) and _called_name(node) in counts


def _is_zero(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value == 0 and not isinstance(node.value,
                                                                                  bool)


def assertion_problems(test: ast.Assert, counts: frozenset[str]) -> list[str]:
    """Why ``test`` cannot fail, if it cannot."""
    cond = test.test
    problems = []
    if _truthy_literal(cond):
        problems.append("asserts a constant that is always true")
    for node in ast.walk(cond):
        if (isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or)
                and any(_truthy_literal(v) for v in node.values)):
            problems.append("`or` with an always-true operand")
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            left, op, right = node.left, node.ops[0], node.comparators[0]
            if (isinstance(op, (ast.Eq, ast.LtE, ast.GtE, ast.Is))
                    and ast.dump(left) == ast.dump(right)
                    and not any(isinstance(n, ast.Call) for n in ast.walk(left))):
                problems.append("compares an expression with itself")
            if ((isinstance(op, ast.GtE) and _is_zero(right) and _non_negative(left, counts))
                    or (isinstance(op, ast.LtE) and _is_zero(left)
                        and _non_negative(right, counts))):
                problems.append("a count compared >= 0")
    return problems


def checking_helpers(trees: Iterable[ast.Module]) -> frozenset[str]:
    """Functions (by name) that check something: they assert, raise, or call a checker."""
    bodies: dict[str, list[ast.AST]] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                bodies.setdefault(node.name, []).extend(ast.walk(node))
    known = set(CHECKING_CALLS)
    changed = True
    while changed:
        changed = False
        for name, nodes in bodies.items():
            if name not in known and any(_checks(n, known) for n in nodes):
                known.add(name)
                changed = True
    return frozenset(known)


def _checks(node: ast.AST, helpers: set[str] | frozenset[str]) -> bool:
    if isinstance(node, (ast.Assert, ast.Raise)):
        return True
    if isinstance(node, ast.Call):
        if _called_name(node) in helpers:
            return True
        return any(k.arg == "check" and isinstance(k.value, ast.Constant) and k.value.value
                   is True for k in node.keywords)
    if isinstance(node, ast.With):  # `with pytest.raises(...)`
        return any(isinstance(i.context_expr, ast.Call) and _checks(i.context_expr, helpers)
                   for i in node.items)
    return False


def scanned_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for d in SCANNED if (root / d).is_dir() for p in (root / d).rglob("*.py"))


def findings(sources: dict[str, str], library: Iterable[ast.Module] = ()) -> list[Finding]:
    """Every assertion that cannot fail and every test that checks nothing in
    ``sources`` (path -> text); ``library`` adds modules whose count functions count."""
    trees = {path: ast.parse(text, filename=path) for path, text in sources.items()}
    counts = count_functions([*trees.values(), *library])
    helpers = checking_helpers(trees.values())
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assert):
                found += [Finding(path, node.lineno, p) for p in assertion_problems(node, counts)]
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.name.startswith("test_") and Path(path).name.startswith("test_")
                    and not any(_checks(n, helpers) for n in ast.walk(node))):
                found.append(Finding(path, node.lineno, f"{node.name} checks nothing"))
    return found


def _library() -> list[ast.Module]:
    return [ast.parse(p.read_text(), filename=str(p))
            for p in sorted((ROOT / "vvu_runtime").rglob("*.py"))]


# -- the guard ---------------------------------------------------------------------------


def test_no_test_under_tests_cannot_fail() -> None:
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in scanned_files()}
    assert len(sources) > 50  # the scan really saw the suite
    problems = findings(sources, _library())
    assert problems == [], "tests that cannot fail:\n" + "\n".join(map(str, problems))


# -- the guard finds what it claims to find ------------------------------------------------

BAD = {
    "assert x() or True": "`or` with an always-true operand",
    "assert True": "asserts a constant that is always true",
    "assert (x(), 'why')": "asserts a constant that is always true",
    "assert f'{x()} seen'": "asserts a constant that is always true",
    "assert len(x()) >= 0": "a count compared >= 0",
    "assert 0 <= len(x())": "a count compared >= 0",
    "assert switch.age() >= 0": "a count compared >= 0",
    "assert a.b == a.b": "compares an expression with itself",
}

LIBRARY = """
class Switch:
    def age(self) -> int:
        stale = [1]
        return len(stale)
"""


@pytest.mark.parametrize("line", sorted(BAD))
def test_each_kind_of_assertion_that_cannot_fail_is_found(line: str) -> None:
    found = findings({"tests/unit/test_x.py": f"def test_x():\n    {line}\n"},
                     [ast.parse(LIBRARY)])
    assert [(f.line, f.what) for f in found] == [(2, BAD[line])]


GOOD = [
    "assert x() or y()",
    "assert not x() or y()",
    "assert fd >= 0",  # an fd may be -1
    "assert 0 <= head < size",  # bounded above too
    "assert len(x()) >= 1",
    "assert x() == x()",  # two calls may differ
    "assert False, 'unreachable'",
    "assert isinstance(x(), int) and 'text' in str(x())",
]


@pytest.mark.parametrize("line", GOOD)
def test_assertions_that_can_fail_are_left_alone(line: str) -> None:
    assert findings({"tests/unit/test_x.py": f"def test_x():\n    {line}\n"},
                    [ast.parse(LIBRARY)]) == []


def test_a_test_that_checks_nothing_is_found_and_helpers_count_transitively() -> None:
    source = """
import contextlib, pytest, subprocess

def _inner(v):
    assert v == 3

def _outer(v):
    _inner(v + 1)

def _quiet(v):
    print(v)

def test_nothing():
    x = 1 + 1
    _quiet(x)

def test_via_helpers():
    _outer(2)

def test_raises():
    with pytest.raises(ValueError):
        int("x")

def test_subprocess():
    subprocess.run(["true"], check=True)

def test_testinfra(host):
    host.check_output("true")

def test_fuzz(data):
    with contextlib.suppress(ValueError):
        int(data)

def helper_not_a_test():
    pass
"""
    found = findings({"tests/unit/test_x.py": source})
    assert [(f.line, f.what) for f in found] == [(13, "test_nothing checks nothing")]


def test_only_test_modules_need_checks() -> None:
    # tests/support may hold test_*-named helpers that are not collected by pytest.
    assert findings({"tests/support/rig.py": "def test_rig_ready():\n    pass\n"}) == []
