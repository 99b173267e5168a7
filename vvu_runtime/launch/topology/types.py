"""Value types of the topology schema: parse a YAML value, describe it, export it.

Each :class:`FieldType` does three things from one definition: ``parse`` a
value read by ruamel.yaml (reporting what was expected, at the value's
``FILE:LINE:COL``, through a :class:`Cursor`), ``describe`` itself for the
printed docs and error messages, and give its JSON Schema fragment. Object
types walk mappings with an :class:`ObjectSpec` (see ``schema.py``) and keep,
per field, the cursor of the key and the value, so the loader's cross-reference
checks can point at the exact place too.
"""

from __future__ import annotations

import difflib
import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from ipaddress import AddressValueError, IPv4Address, IPv4Interface, IPv4Network, NetmaskValueError
from pathlib import Path
from typing import Any, TypeVar

from vvu_runtime.launch.topology.model import Location, Problem

E = TypeVar("E", bound=enum.Enum)

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
_UNITS = {"K": KIB, "M": MIB, "G": GIB, "T": TIB}
SIZE_PATTERN = r"^[0-9]+[KMGT](iB)?$"
_SIZE_RE = re.compile(r"([0-9]+)([KMGT])(iB)?")

#: A lab or node name: usable as a host name (RFC 1123 label, lower case).
NAME_PATTERN = r"^[a-z]([a-z0-9-]{0,29}[a-z0-9])?$"
#: An export name (also part of file names; '/' separates it in ``STORAGE/EXPORT``).
EXPORT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
MAC_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
#: A DNS name or an IPv4/IPv6 address (what ssh and a UDP socket take).
HOSTNAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9.:-]{0,251}[A-Za-z0-9])?$"
#: A POSIX user name.
USER_PATTERN = r"^[a-z_][a-z0-9_-]{0,31}$"
#: An Ansible inventory host name (no spaces, no shell or YAML specials).
INVENTORY_HOST_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,252}$"


class _Invalid(enum.Enum):
    INVALID = "invalid"

    def __repr__(self) -> str:
        return "INVALID"


#: What ``parse`` returns when it reported a problem (callers skip such values).
INVALID = _Invalid.INVALID


class Invalid(Exception):
    """Raised by a scalar conversion; the message says what was expected."""


def show(value: object) -> str:
    """A YAML value as an error message shows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '""' if not value else f'"{value}"'
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, AbstractSet):
        return "a set"
    tag = getattr(getattr(value, "tag", None), "value", None)
    if isinstance(tag, str):
        return f"a value tagged {tag}"
    return f"a {type(value).__name__}"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``; did you mean "x"?`` (or nothing) for a misspelt key or value."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


def one_of(choices: Iterable[str]) -> str:
    return ", ".join(choices)


def size_text(size: int) -> str:
    """``256M``, ``1G``...: the shortest exact spelling of a size in bytes."""
    for suffix, unit in (("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return f"{size} bytes"


# ------------------------------------------------------------------ cursors


@dataclass
class Sink:
    """Collects problems of one load; knows the file and the directory paths are relative to."""

    file: Path
    base: Path
    problems: list[Problem] = field(default_factory=list)


def _lc(getter: Callable[[Any], tuple[int, int]], arg: Any) -> tuple[int, int] | None:
    try:
        line, col = getter(arg)
    except (AttributeError, KeyError, IndexError, TypeError):
        return None
    return int(line), int(col)


@dataclass(frozen=True)
class Cursor:
    """A value's place: its field path, where the value is, where its key is."""

    sink: Sink
    path: str
    where: Location
    key_where: Location

    @classmethod
    def root(cls, sink: Sink) -> Cursor:
        top = Location(sink.file, 1, 1)
        return cls(sink, "", top, top)

    def _at(self, pos: tuple[int, int] | None, fallback: Location) -> Location:
        if pos is None:
            return fallback
        return Location(self.sink.file, pos[0] + 1, pos[1] + 1)

    def start_of(self, container: object) -> Location:
        lc = getattr(container, "lc", None)
        if lc is None or lc.line is None:
            return self.where
        return Location(self.sink.file, lc.line + 1, lc.col + 1)

    def key(self, container: object, key: object) -> Cursor:
        """The cursor of ``container[key]`` (a mapping read by ruamel.yaml round-trip)."""
        lc = getattr(container, "lc", None)
        here = self.start_of(container)
        kw = self._at(_lc(lc.key, key), here) if lc is not None else here
        vw = self._at(_lc(lc.value, key), kw) if lc is not None else kw
        name = str(key)
        return Cursor(self.sink, f"{self.path}.{name}" if self.path else name, vw, kw)

    def item(self, container: object, index: int) -> Cursor:
        """The cursor of ``container[index]`` (a sequence read by ruamel.yaml round-trip)."""
        lc = getattr(container, "lc", None)
        here = self.start_of(container)
        w = self._at(_lc(lc.item, index), here) if lc is not None else here
        return Cursor(self.sink, f"{self.path}[{index}]", w, w)

    def problem(self, message: str, *, at_key: bool = False) -> None:
        self.sink.problems.append(
            Problem(self.key_where if at_key else self.where, self.path, message))


# ------------------------------------------------------------------ the type protocol


class FieldType(ABC):
    """How one field's value is read, described and exported."""

    def parse(self, value: object, cur: Cursor) -> Any:
        """The parsed value, or :data:`INVALID` after reporting at ``cur``."""
        try:
            return self.convert(value, cur)
        except Invalid as e:
            cur.problem(str(e))
            return INVALID

    @abstractmethod
    def convert(self, value: object, cur: Cursor) -> Any:
        """Parse ``value`` or raise :class:`Invalid` (composite types report themselves)."""

    @abstractmethod
    def describe(self) -> str:
        """What the value must be, in words (docs and error messages)."""

    @abstractmethod
    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        """The JSON Schema of the value (object specs are added to ``defs``)."""

    def accepts(self, value: object) -> bool:
        """Whether a value of this YAML shape is meant for this type (for alternatives)."""
        return True

    def expected(self, value: object) -> Invalid:
        return Invalid(f"expected {self.describe()}, got {show(value)}")


class IntType(FieldType):
    def __init__(self, lo: int | None = None, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi

    def accepts(self, value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def convert(self, value: object, cur: Cursor) -> int:
        if not self.accepts(value):
            raise self.expected(value)
        assert isinstance(value, int)
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise self.expected(value)
        return int(value)

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"an integer {self.lo}..{self.hi}"
        if self.lo is not None:
            return f"an integer >= {self.lo}"
        return "an integer"

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "integer"}
        if self.lo is not None:
            s["minimum"] = self.lo
        if self.hi is not None:
            s["maximum"] = self.hi
        return s


class NumberType(FieldType):
    def __init__(self, lo: float, hi: float, unit: str = "") -> None:
        self.lo, self.hi, self.unit = lo, hi, unit

    def accepts(self, value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    def convert(self, value: object, cur: Cursor) -> float:
        if not self.accepts(value):
            raise self.expected(value)
        assert isinstance(value, int | float)
        if not self.lo <= value <= self.hi:
            raise self.expected(value)
        return float(value)

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"a number {self.lo:g}..{self.hi:g}{unit}"

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "number", "minimum": self.lo, "maximum": self.hi}


class BoolType(FieldType):
    def accepts(self, value: object) -> bool:
        return isinstance(value, bool)

    def convert(self, value: object, cur: Cursor) -> bool:
        if not isinstance(value, bool):
            raise self.expected(value)
        return value

    def describe(self) -> str:
        return "true or false"

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "boolean"}


class StrType(FieldType):
    """A non-empty string, optionally matching a pattern (whole string)."""

    def __init__(self, what: str = "a string", pattern: str | None = None, *,
                 empty: bool = False) -> None:
        self.what = what
        self.pattern = pattern
        self.empty = empty
        self._re = re.compile(pattern) if pattern else None

    def accepts(self, value: object) -> bool:
        return isinstance(value, str)

    def convert(self, value: object, cur: Cursor) -> str:
        if not isinstance(value, str) or (not value and not self.empty):
            raise self.expected(value)
        if self._re is not None and not self._re.fullmatch(value):
            raise self.expected(value)
        return str(value)

    def describe(self) -> str:
        return self.what

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string"}
        if not self.empty:
            s["minLength"] = 1
        if self.pattern:
            s["pattern"] = self.pattern
        return s


class ChoiceType(FieldType):
    """One of a few words; ``to`` turns the word into the parsed value (e.g. an enum)."""

    def __init__(self, choices: Sequence[str], to: Callable[[str], Any] = str) -> None:
        self.choices = tuple(choices)
        self.to = to

    @classmethod
    def of(cls, enum_type: type[E]) -> ChoiceType:
        return cls([str(m.value) for m in enum_type], enum_type)

    def accepts(self, value: object) -> bool:
        return isinstance(value, str)

    def convert(self, value: object, cur: Cursor) -> Any:
        if isinstance(value, str) and value in self.choices:
            return self.to(value)
        hint = did_you_mean(value, self.choices) if isinstance(value, str) else ""
        raise Invalid(f"expected {self.describe()}, got {show(value)}{hint}")

    def describe(self) -> str:
        if len(self.choices) == 1:
            return f'"{self.choices[0]}"'
        return "one of " + one_of(self.choices)

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        if len(self.choices) == 1:
            return {"const": self.choices[0]}
        return {"enum": list(self.choices)}


class SizeType(FieldType):
    """A size: a bare integer counts MiB; a string takes a binary suffix (``512M``, ``2G``).

    Parsed into ``unit``-sized integers (MiB for memory, bytes for disks).
    """

    def __init__(self, lo: int, hi: int, *, unit: int, power_of_two: bool = False) -> None:
        self.lo, self.hi, self.unit, self.power_of_two = lo, hi, unit, power_of_two

    def accepts(self, value: object) -> bool:
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))

    def convert(self, value: object, cur: Cursor) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            size = int(value) * MIB
        elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value)):
            size = int(m.group(1)) * _UNITS[m.group(2)]
        else:
            raise self.expected(value)
        if not self.lo <= size <= self.hi:
            raise self.expected(value)
        if size % self.unit:
            raise Invalid(f"expected a whole number of {size_text(self.unit)}, got {show(value)}")
        if self.power_of_two and size & (size - 1):
            raise self.expected(value)
        return size // self.unit

    def describe(self) -> str:
        two = "a power of two " if self.power_of_two else "a "
        return (f"{two}size {size_text(self.lo)}..{size_text(self.hi)} "
                '(an integer of MiB, or a string like "512M", "2G")')

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"oneOf": [
            {"type": "integer", "minimum": max(1, self.lo // MIB), "maximum": self.hi // MIB},
            {"type": "string", "pattern": SIZE_PATTERN},
        ]}


class MacType(StrType):
    def __init__(self) -> None:
        super().__init__('a unicast MAC address like "52:54:00:12:34:56"', MAC_PATTERN)

    def convert(self, value: object, cur: Cursor) -> str:
        mac = super().convert(value, cur).lower()
        if int(mac[:2], 16) & 1:
            raise Invalid(f"expected {self.what}, got a multicast address {show(value)}")
        return mac


class InterfaceType(FieldType):
    """``A.B.C.D/LEN`` or a bare ``A.B.C.D`` (the loader gives it its subnet's length)."""

    def accepts(self, value: object) -> bool:
        return isinstance(value, str)

    def convert(self, value: object, cur: Cursor) -> IPv4Interface | IPv4Address:
        if not isinstance(value, str):
            raise self.expected(value)
        try:
            return IPv4Interface(value) if "/" in value else IPv4Address(value)
        except (AddressValueError, NetmaskValueError, ValueError) as e:
            raise Invalid(f"expected {self.describe()}, got {show(value)} ({e})") from None

    def describe(self) -> str:
        return 'an IPv4 address like "10.10.1.11/24"'

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "string", "pattern": r"^[0-9]{1,3}(\.[0-9]{1,3}){3}(/[0-9]{1,2})?$"}


class NetworkType(FieldType):
    def __init__(self, min_prefix: int = 8, max_prefix: int = 29) -> None:
        self.min_prefix, self.max_prefix = min_prefix, max_prefix

    def accepts(self, value: object) -> bool:
        return isinstance(value, str)

    def convert(self, value: object, cur: Cursor) -> IPv4Network:
        if not isinstance(value, str) or "/" not in value:
            raise self.expected(value)
        try:
            net = IPv4Network(value)
        except (AddressValueError, NetmaskValueError, ValueError) as e:
            raise Invalid(f"expected {self.describe()}, got {show(value)} ({e})") from None
        if not self.min_prefix <= net.prefixlen <= self.max_prefix:
            raise self.expected(value)
        return net

    def describe(self) -> str:
        return (f'an IPv4 subnet like "10.10.1.0/24" (prefix length '
                f"{self.min_prefix}..{self.max_prefix})")

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "string", "pattern": r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$"}


class PathType(FieldType):
    """A path; relative paths are relative to the topology file's directory."""

    def __init__(self, what: str = "a path", forbid: str = "") -> None:
        self.what, self.forbid = what, forbid

    def accepts(self, value: object) -> bool:
        return isinstance(value, str)

    def convert(self, value: object, cur: Cursor) -> Path:
        if not isinstance(value, str) or not value:
            raise self.expected(value)
        bad = sorted({c for c in value if c in self.forbid or c == "\0"})
        if bad:
            raise Invalid(f"expected {self.describe()}, got {show(value)} (contains "
                          f"{', '.join(repr(c) for c in bad)})")
        return cur.sink.base / Path(value).expanduser()

    def describe(self) -> str:
        extra = f" without {' '.join(repr(c) for c in self.forbid)}" if self.forbid else ""
        return f"{self.what}{extra} (relative to the topology file)"

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string", "minLength": 1}
        if self.forbid:
            s["pattern"] = "^[^" + re.escape(self.forbid) + "]+$"
        return s


class RegexType(FieldType):
    def accepts(self, value: object) -> bool:
        return isinstance(value, str)

    def convert(self, value: object, cur: Cursor) -> str:
        if not isinstance(value, str) or not value:
            raise self.expected(value)
        try:
            re.compile(value)
        except re.error as e:
            raise Invalid(f"expected {self.describe()}, got {show(value)} ({e})") from None
        return value

    def describe(self) -> str:
        return "a regular expression (Python syntax, searched in the output)"

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "string", "minLength": 1, "format": "regex"}


class Nullable(FieldType):
    """``null`` or the inner type."""

    def __init__(self, inner: FieldType) -> None:
        self.inner = inner

    def convert(self, value: object, cur: Cursor) -> Any:
        return None if value is None else self.inner.convert(value, cur)

    def describe(self) -> str:
        return f"{self.inner.describe()} or null"

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [self.inner.json_schema(defs), {"type": "null"}]}


class Alternatives(FieldType):
    """The first alternative whose ``accepts`` takes the value's YAML shape."""

    def __init__(self, *alternatives: FieldType) -> None:
        self.alternatives = alternatives

    def accepts(self, value: object) -> bool:
        return any(a.accepts(value) for a in self.alternatives)

    def convert(self, value: object, cur: Cursor) -> Any:
        for a in self.alternatives:
            if a.accepts(value):
                return a.convert(value, cur)
        raise self.expected(value)

    def describe(self) -> str:
        return " or ".join(a.describe() for a in self.alternatives)

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [a.json_schema(defs) for a in self.alternatives]}
