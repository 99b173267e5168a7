"""The appliance configuration: one schema, read from JSON or a small YAML subset.

Where it comes from (first found): the systemd credential ``vvu.appliance``
(JSON text, what ``vvu-launch`` passes), else ``/etc/vvu/appliance.yaml``.
Examples::

    {"kind": "vswitch", "links": [{"name": "c1-nic0"}, {"name": "c2-nic0"}],
     "options": {"busy_poll_us": 0}}

    {"kind": "vswitch", "links": [{"name": "c1-nic0"}],
     "tunnels": [{"name": "sw2", "remote": "192.0.2.2", "port": 4789, "vni": 100}],
     "underlay": {"address": "10.0.3.15", "port": 4789, "mtu": 1500}}

    {"kind": "vswitch", "links": [{"name": "c1-nic0"}, {"name": "c2-nic0"}],
     "options": {"engine": "testpmd"}}      # DPDK testpmd behind vvu-proxy: exactly 2 links

    kind: storage
    exports:
      - name: c1-disk0
        disk: data0              # /dev/disk/by-id/virtio-data0, served whole
        readonly: false
      - name: c2-disk0
        file: {disk: data0, path: c2.img, size: 256M}   # a file on data0's file system
        engine: qsd              # served by qemu-storage-daemon behind vvu-proxy
    options:
      direct: true

    kind: fs
    exports:
      - name: c1-fs0             # the link; virtiofsd serves it through vvu-proxy
        disk: data0              # data0's file system (ext4 made on a blank disk)
        path: share              # the directory shared (made if missing)
    options: {cache: auto, sandbox: namespace}

The schema is the table :data:`SCHEMA` (also what ``vvu-backend --schema``
prints). Every error names the file, the line and the field, and all errors are
reported at once::

    /etc/vvu/appliance.yaml:4: exports[0].disk: required (one of disk, file)

The reader accepts JSON (any JSON document) and this YAML subset, with line
numbers kept for every field: block mappings (``key: value``), block sequences
(``- item``), flow collections on one line (``{a: 1, b: x}``, ``[1, 2]``),
scalars (plain, ``"double"`` or ``'single'`` quoted, integers, ``true``/``false``,
``null``/``~``) and ``#`` comments. Not supported: anchors, tags, multi-line
strings, several documents. The guest has only python3's standard library.
"""

from __future__ import annotations

import bisect
import json
import json.decoder
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_FILE",
    "CREDENTIAL",
    "SCHEMA",
    "ApplianceConfig",
    "ConfigError",
    "Export",
    "FileExport",
    "FsExport",
    "Link",
    "Node",
    "Tunnel",
    "Underlay",
    "load_config",
    "parse_config",
    "parse_document",
    "schema_text",
]

CONFIG_FILE = Path("/etc/vvu/appliance.yaml")
CREDENTIAL = "vvu.appliance"
#: A link or export name: also the VVU device name given to vvu-devd (``--device NAME:...``).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
#: A virtio-blk serial (``-device virtio-blk-pci,serial=S``): at most 20 bytes.
SERIAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,19}")
SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.I)


class ConfigError(Exception):
    """The configuration is missing or invalid; ``problems`` holds one line per error."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------
# The document reader (JSON and a YAML subset), keeping line numbers
# --------------------------------------------------------------------------


@dataclass
class Node:
    """A parsed value and the line it starts on (for a mapping entry: the key's line).

    ``value`` is a str, int, float, bool, None, ``list[Node]`` or ``dict[str, Node]``.
    """

    value: Any
    line: int


class _SyntaxError(Exception):
    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(message)


_PLAIN_END = ",]}"
#: JSON's string scanner (escapes, \u sequences): scanstring(text, pos after the quote).
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _scalar(text: str, line: int) -> Node:
    """A plain or quoted scalar (YAML 1.2 core schema, roughly)."""
    t = text.strip()
    if t.startswith('"'):
        try:
            return Node(json.loads(t), line)
        except ValueError as e:
            raise _SyntaxError(line, f"bad double-quoted string {t}: {e}") from e
    if t.startswith("'"):
        if len(t) < 2 or not t.endswith("'"):
            raise _SyntaxError(line, f"unterminated single-quoted string {t}")
        return Node(t[1:-1].replace("''", "'"), line)
    if t in ("", "~", "null", "Null", "NULL"):
        return Node(None, line)
    if t in ("true", "True", "TRUE"):
        return Node(True, line)
    if t in ("false", "False", "FALSE"):
        return Node(False, line)
    if re.fullmatch(r"[-+]?\d+", t):
        return Node(int(t), line)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", t):
        return Node(float(t), line)
    if t[0] in "&*!|>%@`":
        raise _SyntaxError(line, f"unsupported YAML ({t[0]!r}): use plain values or JSON")
    return Node(t, line)


class _FlowParser:
    """JSON, plus YAML's flow style: unquoted keys and scalars, ``#`` comments."""

    def __init__(self, text: str, first_line: int = 1) -> None:
        self.text = text
        self.pos = 0
        self.first_line = first_line
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line(self, pos: int | None = None) -> int:
        p = self.pos if pos is None else pos
        return self.first_line + bisect.bisect_right(self._starts, p) - 1

    def _skip(self) -> None:
        t = self.text
        while self.pos < len(t):
            c = t[self.pos]
            if c in " \t\r\n":
                self.pos += 1
            elif c == "#":
                end = t.find("\n", self.pos)
                self.pos = len(t) if end < 0 else end
            else:
                break

    def document(self) -> Node:
        node = self.value()
        self._skip()
        if self.pos != len(self.text):
            raise _SyntaxError(self.line(), f"unexpected {self.text[self.pos]!r} after the value")
        return node

    def value(self) -> Node:
        self._skip()
        t = self.text
        if self.pos >= len(t):
            raise _SyntaxError(self.line(), "unexpected end of the document")
        c = t[self.pos]
        line = self.line()
        if c == "{":
            return self._mapping(line)
        if c == "[":
            return self._sequence(line)
        if c == '"':
            try:
                s, self.pos = _scanstring(t, self.pos + 1)
            except ValueError as e:
                raise _SyntaxError(line, f"bad string: {e}") from e
            return Node(s, line)
        start = self.pos
        while self.pos < len(t) and t[self.pos] not in _PLAIN_END + ":\n" + "#":
            self.pos += 1
        if self.pos == start:
            raise _SyntaxError(line, f"unexpected {c!r}")
        return _scalar(t[start : self.pos], line)

    def _expect(self, chars: str, what: str) -> str:
        self._skip()
        if self.pos >= len(self.text) or self.text[self.pos] not in chars:
            got = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end"
            raise _SyntaxError(self.line(), f"expected {what}, found {got}")
        c = self.text[self.pos]
        self.pos += 1
        return c

    def _mapping(self, line: int) -> Node:
        self.pos += 1
        items: dict[str, Node] = {}
        self._skip()
        if self.text.startswith("}", self.pos):
            self.pos += 1
            return Node(items, line)
        while True:
            self._skip()
            key_line = self.line()
            key = self.value()
            if not isinstance(key.value, str):
                raise _SyntaxError(key_line, f"a key must be a string, not {key.value!r}")
            self._expect(":", "':' after a key")
            val = self.value()
            if key.value in items:
                raise _SyntaxError(key_line, f"duplicate key {key.value!r}")
            items[key.value] = Node(val.value, key_line)
            if self._expect(",}", "',' or '}'") == "}":
                return Node(items, line)

    def _sequence(self, line: int) -> Node:
        self.pos += 1
        items: list[Node] = []
        self._skip()
        if self.text.startswith("]", self.pos):
            self.pos += 1
            return Node(items, line)
        while True:
            items.append(self.value())
            if self._expect(",]", "',' or ']'") == "]":
                return Node(items, line)


def _strip_comment(text: str) -> str:
    """Drop a ``#`` comment (one at the start or after a blank, outside quotes)."""
    quote = None
    for i, c in enumerate(text):
        if quote:
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
    return text.rstrip()


_KEY_RE = re.compile(r"""("(?:[^"\\]|\\.)*"|'[^']*'|[^\s"'#\[\]{},:][^:#]*?)\s*:(?:\s+|$)(.*)""")


class _BlockParser:
    def __init__(self, text: str) -> None:
        self.lines: list[tuple[int, int, str]] = []  # (line number, indent, content)
        for n, raw in enumerate(text.splitlines(), 1):
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise _SyntaxError(n, "a tab in the indentation (YAML allows spaces only)")
            content = _strip_comment(raw)
            if content.strip():
                if content.strip() in ("---", "..."):
                    continue
                self.lines.append((n, len(content) - len(content.lstrip()), content.strip()))
        self.i = 0

    def document(self) -> Node:
        if not self.lines:
            return Node(None, 1)
        node = self.block(self.lines[0][1])
        if self.i < len(self.lines):
            n, _, content = self.lines[self.i]
            raise _SyntaxError(n, f"unexpected indentation before {content!r}")
        return node

    def block(self, indent: int) -> Node:
        n, ind, content = self.lines[self.i]
        if ind != indent:
            raise _SyntaxError(n, "bad indentation")
        if content == "-" or content.startswith("- "):
            return self._sequence(indent)
        if _KEY_RE.fullmatch(content):
            return self._mapping(indent)
        self.i += 1
        return self._inline(content, n)

    def _inline(self, text: str, line: int) -> Node:
        if text[:1] in "[{":
            return _FlowParser(text, line).document()
        return _scalar(text, line)

    def _nested(self, indent: int, line: int) -> Node:
        """The block under a ``key:`` or ``-`` with nothing after it (or null)."""
        if self.i < len(self.lines) and self.lines[self.i][1] > indent:
            return self.block(self.lines[self.i][1])
        return Node(None, line)

    def _sequence(self, indent: int) -> Node:
        items: list[Node] = []
        line0 = self.lines[self.i][0]
        while self.i < len(self.lines):
            n, ind, content = self.lines[self.i]
            is_item = content == "-" or content.startswith("- ")
            if ind < indent or (ind == indent and not is_item):
                break  # the parent mapping's next key ("key:" then "- item" compact style)
            if ind > indent or not is_item:
                raise _SyntaxError(n, f"expected '- item' at column {indent + 1}")
            rest = content[1:].lstrip()
            if not rest:
                self.i += 1
                items.append(self._nested(indent, n))
            elif rest[:1] not in "[{" and _KEY_RE.fullmatch(rest):
                # "- key: value": a mapping whose keys line up with "key".
                col = ind + (len(content) - len(rest))
                self.lines[self.i] = (n, col, rest)
                items.append(self._mapping(col))
            else:
                self.i += 1
                items.append(self._inline(rest, n))
        return Node(items, line0)

    def _mapping(self, indent: int) -> Node:
        items: dict[str, Node] = {}
        line0 = self.lines[self.i][0]
        while self.i < len(self.lines):
            n, ind, content = self.lines[self.i]
            if ind < indent:
                break
            m = _KEY_RE.fullmatch(content)
            if ind > indent or m is None:
                raise _SyntaxError(n, f"expected 'key: value' at column {indent + 1}")
            key = _scalar(m.group(1), n).value
            if not isinstance(key, str):
                key = str(key)
            if key in items:
                raise _SyntaxError(n, f"duplicate key {key!r}")
            self.i += 1
            rest = m.group(2).strip()
            value = self._inline(rest, n) if rest else self._nested(indent, n)
            if not rest and value.value is None and self.i < len(self.lines):
                # "key:" followed by "- item" at the same indentation (compact YAML).
                _, nind, ncontent = self.lines[self.i]
                if nind == indent and (ncontent == "-" or ncontent.startswith("- ")):
                    value = self._sequence(indent)
            items[key] = Node(value.value, n)
        return Node(items, line0)


def parse_document(text: str) -> Node:
    """Parse JSON or the YAML subset; :class:`ValueError` ``"LINE: message"`` if malformed."""
    stripped = "\n".join(_strip_comment(x) for x in text.splitlines()).lstrip()
    try:
        if stripped and stripped[0] in "[{":
            return _FlowParser(text).document()
        return _BlockParser(text).document()
    except _SyntaxError as e:
        raise ValueError(f"{e.line}: {e}") from e


# --------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------


def _size(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    if isinstance(value, str) and (m := SIZE_RE.fullmatch(value.strip())):
        n = int(m.group(1)) << (10 * "_KMGT".index(m.group(2).upper() or "_"))
        return n if n > 0 else None
    return None


def _check_name(v: Any) -> str | None:
    if isinstance(v, str) and NAME_RE.fullmatch(v):
        return None
    return "a name: letters, digits, '.', '_', '-' (at most 63, not starting with . _ -)"


def _check_serial(v: Any) -> str | None:
    if isinstance(v, str) and SERIAL_RE.fullmatch(v):
        return None
    return "a virtio-blk serial: letters, digits, '.', '_', '-', at most 20"


def _check_path(v: Any) -> str | None:
    if isinstance(v, str) and v and not v.startswith("/") and ".." not in v.split("/"):
        return None
    return "a relative path on the data disk's file system (no '..')"


_IPV4_RE = re.compile(r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def _check_ipv4(v: Any) -> str | None:
    return None if isinstance(v, str) and _IPV4_RE.fullmatch(v) else "an IPv4 address"


def _check_host(v: Any) -> str | None:
    if isinstance(v, str) and _HOST_RE.fullmatch(v):
        return None
    return "an IPv4 address or a host name"


def _check_size(v: Any) -> str | None:
    return None if _size(v) is not None else "a size: bytes or N[K|M|G|T] (e.g. 256M)"


def _at_least(low: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v >= low else f"at least {low}"

    return check


def _between(low: int, high: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if low <= v <= high else f"between {low} and {high}"

    return check


@dataclass(frozen=True)
class Field:
    """One setting: its type (``str``, ``int``, ``bool``, ``size``, ``map``, ``list``)."""

    name: str
    type: str
    help: str
    required: bool = False
    default: Any = None
    check: Callable[[Any], str | None] | None = None
    #: A ``map``'s fields, or the fields of a ``list``'s mapping items.
    fields: tuple[Field, ...] = ()
    #: Other fields of the same mapping of which exactly one must be given.
    one_of: tuple[str, ...] = ()


LINK = (Field("name", "str", "the VVU link's name (vvu-devd --device NAME:...)", True,
              check=_check_name),)
FILE = (
    Field("disk", "str", "serial of the data disk holding the file system", True,
          check=_check_serial),
    Field("path", "str", "the file, relative to that file system's root", True,
          check=_check_path),
    Field("size", "size", "created with this size if missing (sparse)", True,
          check=_check_size),
)
#: An export's ``protocol``: the vhost-user device type the consumer gets.
PROTOCOLS = ("blk", "scsi")
#: An export's ``engine``: what serves it inside the appliance. ``qsd`` is
#: qemu-storage-daemon's vhost-user-blk export behind vvu-proxy (docs/vvu-proxy.md).
ENGINES = ("vvu-blk", "qsd")
EXPORT = (
    Field("name", "str", "the VVU link's name; also the disk serial the consumer sees (GET_ID)",
          True, check=_check_name),
    Field("disk", "str", "serial of a data disk (/dev/disk/by-id/virtio-SERIAL), served whole",
          check=_check_serial, one_of=("disk", "file")),
    Field("file", "map", "a file on a data disk's file system", fields=FILE,
          one_of=("disk", "file")),
    Field("readonly", "bool", "offer a read-only disk", default=False),
    Field("protocol", "str", "how the consumer sees the disk: blk (vhost-user-blk, vvu-blk) "
          "or scsi (vhost-user-scsi, vvu-scsi, the disk as LUN 0)", default="blk",
          check=lambda v: None if v in PROTOCOLS else "blk or scsi"),
    Field("engine", "str", "what serves the disk: vvu-blk (ours; vvu-scsi for protocol scsi) "
          "or qsd (qemu-storage-daemon behind vvu-proxy, protocol blk only)",
          default="vvu-blk", check=lambda v: None if v in ENGINES else "vvu-blk or qsd"),
)
FS_EXPORT = (
    Field("name", "str", "the VVU link's name (the consumer's mount tag is its own)", True,
          check=_check_name),
    Field("disk", "str", "serial of the data disk whose file system holds the directory "
          "(an ext4 file system is made on a blank disk)", True, check=_check_serial),
    Field("path", "str", "the directory shared, relative to that file system's root "
          "(made if missing)", default=".", check=_check_path),
)
#: virtiofsd's --cache and --sandbox values.
FS_CACHE = ("auto", "always", "never", "metadata")
FS_SANDBOX = ("namespace", "chroot", "none")
TUNNEL = (
    Field("name", "str", "the tunnel port's name (the peer switch)", True, check=_check_name),
    Field("remote", "str", "the peer's address (its host's)", True, check=_check_host),
    Field("port", "int", "the peer's UDP port", default=4789, check=_between(1, 65535)),
    Field("vni", "int", "the VXLAN network identifier", True, check=_between(1, (1 << 24) - 1)),
)
UNDERLAY = (
    Field("address", "str", "the tunnels' local address (the underlay NIC's)",
          default="0.0.0.0", check=_check_ipv4),
    Field("port", "int", "the tunnels' local UDP port", default=4789,
          check=_between(1, 65535)),
    Field("mtu", "int", "MTU of the network the tunnels cross", default=1500,
          check=_between(576, 65535)),
)
#: A vswitch's ``options.engine``: what forwards its frames. ``testpmd`` is DPDK's
#: testpmd behind vvu-proxy, io forward between exactly two ports (appliance/testpmd.py).
SWITCH_ENGINES = ("vvu-switch", "testpmd")
VSWITCH_OPTIONS = (
    Field("busy_poll_us", "int", "vvu-switch --busy-poll (microseconds)", default=0,
          check=_at_least(0)),
    Field("queues", "int", "queue pairs offered on every port", default=1,
          check=_between(1, 64)),
    Field("engine", "str", "what forwards the frames: vvu-switch (ours: learning switch, "
          "any number of ports) or testpmd (DPDK testpmd behind vvu-proxy: io forward "
          "between exactly 2 ports)", default="vvu-switch",
          check=lambda v: None if v in SWITCH_ENGINES else "vvu-switch or testpmd"),
)
STORAGE_OPTIONS = (
    Field("direct", "bool", "open disks and files O_DIRECT", default=False),
    Field("queues", "int", "most request queues offered per disk", default=4,
          check=_between(1, 64)),
    Field("poll_us", "int", "poll a busy ring this long before sleeping", default=50,
          check=_at_least(0)),
    Field("busy_poll_us", "int", "vvu-blk --busy-poll: after serving, poll with kicks off "
          "this long (microseconds)", default=0, check=_between(0, 1_000_000)),
)
FS_OPTIONS = (
    Field("cache", "str", "virtiofsd --cache: auto, always, never or metadata",
          default="auto", check=lambda v: None if v in FS_CACHE else ", ".join(FS_CACHE)),
    Field("sandbox", "str", "virtiofsd --sandbox: namespace, chroot or none",
          default="namespace",
          check=lambda v: None if v in FS_SANDBOX else ", ".join(FS_SANDBOX)),
)

#: kind -> the fields of a configuration of that kind (``kind`` itself included).
SCHEMA: dict[str, tuple[Field, ...]] = {
    "vswitch": (
        Field("kind", "str", "vswitch", True),
        Field("links", "list", "the switch ports, one per VVU link", True, fields=LINK),
        Field("options", "map", "switch options", fields=VSWITCH_OPTIONS),
        Field("tunnels", "list", "VXLAN tunnels to switches on other hosts", fields=TUNNEL),
        Field("underlay", "map", "where the tunnels' UDP socket is", fields=UNDERLAY),
    ),
    "storage": (
        Field("kind", "str", "storage", True),
        Field("exports", "list", "the disks served, one per VVU link", True, fields=EXPORT),
        Field("options", "map", "storage target options", fields=STORAGE_OPTIONS),
    ),
    "fs": (
        Field("kind", "str", "fs", True),
        Field("exports", "list", "the directories shared, one per VVU link (virtiofsd "
              "behind vvu-proxy)", True, fields=FS_EXPORT),
        Field("options", "map", "virtiofsd options", fields=FS_OPTIONS),
    ),
}

_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "size": (int, str),
    "map": (dict,),
    "list": (list,),
}


def _type_ok(f: Field, value: Any) -> bool:
    if f.type == "int" and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[f.type])


def _validate_map(fields: Sequence[Field], node: Node, where: str,
                  problems: list[tuple[int, str, str]]) -> None:
    known = {f.name: f for f in fields}
    items: dict[str, Node] = node.value
    for key, entry in items.items():
        if key not in known:
            names = ", ".join(known)
            problems.append((entry.line, f"{where}{key}", f"unknown field (known: {names})"))
    seen_groups: set[tuple[str, ...]] = set()
    for f in fields:
        child = items.get(f.name)
        path = f"{where}{f.name}"
        if f.one_of and f.one_of not in seen_groups:
            seen_groups.add(f.one_of)
            given = [n for n in f.one_of if n in items]
            if len(given) != 1:
                what = "required" if not given else f"only one may be given, not {given}"
                problems.append((node.line, f"{where}{f.one_of[0]}",
                                 f"{what} (one of {', '.join(f.one_of)})"))
        if child is None:
            if f.required:
                problems.append((node.line, path, "required"))
            continue
        _validate(f, child, path, problems)


def _validate(f: Field, node: Node, path: str, problems: list[tuple[int, str, str]]) -> None:
    if not _type_ok(f, node.value):
        problems.append((node.line, path, f"must be {_TYPE_NAMES[f.type]}, not "
                         f"{json.dumps(_plain(node))}"))
        return
    if f.type == "map":
        _validate_map(f.fields, node, path + ".", problems)
    elif f.type == "list":
        if not node.value:
            problems.append((node.line, path, "must list at least one entry"))
        for i, item in enumerate(node.value):
            where = f"{path}[{i}]"
            if not isinstance(item.value, dict):
                problems.append((item.line, where, "must be a mapping"))
                continue
            _validate_map(f.fields, item, where + ".", problems)
    elif f.check is not None and (msg := f.check(node.value)) is not None:
        problems.append((node.line, path, f"{msg}; got {json.dumps(_plain(node))}"))


_TYPE_NAMES = {"str": "a string", "int": "an integer", "bool": "true or false",
               "size": "a size", "map": "a mapping", "list": "a list"}


def _plain(node: Node) -> Any:
    if isinstance(node.value, dict):
        return {k: _plain(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [_plain(v) for v in node.value]
    return node.value


def schema_text() -> str:
    """The schema as text (``vvu-backend --schema``, the README)."""
    out: list[str] = []

    def walk(fields: Sequence[Field], indent: str) -> None:
        for f in fields:
            req = "required" if f.required else (
                "one of " + "/".join(f.one_of) if f.one_of else f"default {json.dumps(f.default)}")
            out.append(f"{indent}{f.name}: {f.type} ({req}): {f.help}")
            walk(f.fields, indent + "  ")

    for kind, fields in SCHEMA.items():
        out.append(f"kind {kind}:")
        walk(fields, "  ")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# The typed result
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    name: str


@dataclass(frozen=True)
class Tunnel:
    name: str
    remote: str
    port: int
    vni: int


@dataclass(frozen=True)
class Underlay:
    address: str
    port: int
    mtu: int


@dataclass(frozen=True)
class FileExport:
    disk: str
    path: str
    size: int


@dataclass(frozen=True)
class Export:
    name: str
    disk: str | None
    file: FileExport | None
    readonly: bool
    protocol: str = "blk"
    engine: str = "vvu-blk"

    @property
    def serial(self) -> str:
        """The serial the consumer's disk reports (GET_ID): the export name, cut to 20."""
        return self.name[:20]


@dataclass(frozen=True)
class FsExport:
    """A directory of a data disk's file system, shared by virtiofsd over one VVU link."""

    name: str
    disk: str
    path: str


@dataclass(frozen=True)
class ApplianceConfig:
    kind: str
    source: str
    links: tuple[Link, ...] = ()
    exports: tuple[Export, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    #: A vswitch's tunnels and their socket (None: no tunnels).
    tunnels: tuple[Tunnel, ...] = ()
    underlay: Underlay | None = None
    #: An fs appliance's shares.
    shares: tuple[FsExport, ...] = ()

    @property
    def link_names(self) -> list[str]:
        """The VVU links this appliance serves, in configuration order."""
        if self.kind == "vswitch":
            return [link.name for link in self.links]
        if self.kind == "fs":
            return [s.name for s in self.shares]
        return [e.name for e in self.exports]

    @property
    def backend(self) -> str:
        """The backend unit that serves this kind (``switch``, ``blk`` or ``fs``)."""
        return {"vswitch": "switch", "storage": "blk", "fs": "fs"}[self.kind]


def _defaults(fields: Sequence[Field], given: dict[str, Any]) -> dict[str, Any]:
    return {f.name: given.get(f.name, f.default) for f in fields}


def _check_engines(root: Node, problems: list[tuple[int, str, str]]) -> None:
    """qemu-storage-daemon has a vhost-user-blk export only: ``engine: qsd`` with
    ``protocol: scsi`` is refused, naming the export."""
    entries = root.value.get("exports", Node(None, 0)).value
    for i, item in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(item.value, dict):
            continue
        engine, protocol = item.value.get("engine"), item.value.get("protocol")
        if engine is not None and engine.value == "qsd" and protocol is not None \
                and protocol.value == "scsi":
            name = item.value.get("name")
            label = repr(name.value) if name is not None else f"number {i}"
            problems.append((engine.line, f"exports[{i}].engine",
                             f"qsd serves protocol blk only (qemu-storage-daemon has no "
                             f"vhost-user-scsi export); export {label} has protocol scsi: "
                             "use engine vvu-blk (vvu-scsi) or protocol blk"))


def _check_switch_engine(root: Node, problems: list[tuple[int, str, str]]) -> None:
    """``engine: testpmd`` forwards (io) between port 0 and port 1 and nothing else:
    exactly two links, no tunnels, no vvu-switch options (testpmd polls by itself
    and serves one queue pair per port)."""
    if root.value.get("kind", Node(None, 0)).value != "vswitch":
        return
    opts = root.value.get("options")
    if opts is None or not isinstance(opts.value, dict):
        return
    engine = opts.value.get("engine")
    if engine is None or engine.value != "testpmd":
        return
    links = root.value.get("links")
    if links is not None and isinstance(links.value, list) and len(links.value) != 2:
        problems.append((links.line, "links",
                         f"engine testpmd forwards between exactly 2 ports (io forward), "
                         f"and {len(links.value)} links are given: give 2, or use engine "
                         "vvu-switch"))
    for key in ("tunnels", "underlay"):
        if (node := root.value.get(key)) is not None:
            problems.append((node.line, key, "engine testpmd has no tunnels (it forwards "
                             "between its 2 ports only): remove it, or use engine vvu-switch"))
    for key in ("busy_poll_us", "queues"):
        if (node := opts.value.get(key)) is not None:
            problems.append((node.line, f"options.{key}",
                             f"a vvu-switch option; engine testpmd busy-polls one queue pair "
                             f"per port by itself: remove {key}, or use engine vvu-switch"))


def parse_config(text: str, source: str) -> ApplianceConfig:
    """Parse and validate; :class:`ConfigError` lists each problem (``SOURCE:LINE: FIELD: msg``)."""
    try:
        root = parse_document(text)
    except ValueError as e:
        raise ConfigError([f"{source}:{e}"]) from e
    problems: list[tuple[int, str, str]] = []
    if not isinstance(root.value, dict):
        raise ConfigError([f"{source}:{root.line}: the configuration must be a mapping "
                           f"with 'kind' (one of {', '.join(SCHEMA)})"])
    kind_node = root.value.get("kind")
    if kind_node is None or kind_node.value not in SCHEMA:
        line = root.line if kind_node is None else kind_node.line
        got = "missing" if kind_node is None else f"got {json.dumps(_plain(kind_node))}"
        raise ConfigError([f"{source}:{line}: kind: must be one of {', '.join(SCHEMA)} ({got})"])
    kind: str = kind_node.value
    _validate_map(SCHEMA[kind], root, "", problems)
    _check_engines(root, problems)
    _check_switch_engine(root, problems)
    seen: set[str] = set()
    for key in ("links", "exports", "tunnels"):
        entries = root.value.get(key, Node(None, 0)).value
        for i, item in enumerate(entries if isinstance(entries, list) else []):
            name = item.value.get("name") if isinstance(item.value, dict) else None
            if name is not None and isinstance(name.value, str):
                if name.value in seen:
                    problems.append((name.line, f"{key}[{i}].name",
                                     f"{name.value!r} is used twice"))
                seen.add(name.value)
    if problems:
        raise ConfigError([f"{source}:{line}: {path}: {msg}"
                           for line, path, msg in sorted(problems, key=lambda p: p[0])])
    data = _plain(root)
    opts_fields = SCHEMA[kind][2].fields
    options = _defaults(opts_fields, data.get("options") or {})
    if kind == "vswitch":
        tunnels = tuple(Tunnel(**_defaults(TUNNEL, x)) for x in data.get("tunnels") or [])
        underlay = None
        if tunnels or "underlay" in data:
            underlay = Underlay(**_defaults(UNDERLAY, data.get("underlay") or {}))
        return ApplianceConfig(kind, source, links=tuple(Link(x["name"]) for x in data["links"]),
                               options=options, tunnels=tunnels, underlay=underlay)
    if kind == "fs":
        shares = tuple(FsExport(**_defaults(FS_EXPORT, x)) for x in data["exports"])
        return ApplianceConfig(kind, source, shares=shares, options=options)
    exports = []
    for x in data["exports"]:
        f = x.get("file")
        fe = None if f is None else FileExport(f["disk"], f["path"], _size(f["size"]) or 0)
        exports.append(Export(x["name"], x.get("disk"), fe, bool(x.get("readonly", False)),
                              x.get("protocol", "blk"), x.get("engine", "vvu-blk")))
    return ApplianceConfig(kind, source, exports=tuple(exports), options=options)


def load_config(credentials: Sequence[Path] = (), path: Path = CONFIG_FILE) -> ApplianceConfig:
    """The credential ``vvu.appliance`` from the first directory having it, else ``path``."""
    for d in credentials:
        cred = d / CREDENTIAL
        try:
            text = cred.read_text()
        except OSError:
            continue
        return parse_config(text, f"credential {CREDENTIAL}")
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise ConfigError([f"{path}: no configuration: write {path} or pass the credential "
                           f"{CREDENTIAL} (JSON)"]) from e
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from e
    return parse_config(text, str(path))
