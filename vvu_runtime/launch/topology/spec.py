"""Fields and object specs: the declarative half of the schema machinery.

A :class:`Field` is one row of the schema table (name, type, default, help, the
appliance kinds that accept it, whether ``defaults:`` may set it). An
:class:`ObjectSpec` is a mapping made of fields; it parses a ruamel.yaml mapping
into a :class:`Parsed` (values and per-field cursors, so later checks can point
at the exact key or value), exports its JSON Schema, and prints its docs table.
The composite types (:class:`ObjectType`, :class:`ListType`, :class:`MapType`,
:class:`Shorthand`, :class:`Tagged`) connect specs into the whole file's schema.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vvu_runtime.launch.topology.types import (
    INVALID,
    ChoiceType,
    Cursor,
    FieldType,
    Invalid,
    Sink,
    did_you_mean,
    one_of,
    show,
)


class _Required(enum.Enum):
    REQUIRED = "required"


#: The default of a field that must be given.
REQUIRED = _Required.REQUIRED


@dataclass(frozen=True)
class Field:
    """One field of an object: a row of the schema table."""

    name: str
    type: FieldType
    help: str
    #: The default, written as in YAML (parsed by ``type``), or REQUIRED.
    default: Any = None
    #: Words for the docs when the default is derived (``default`` is then None).
    default_doc: str | None = None
    #: The appliance kinds that accept the field (None: every kind / not an appliance).
    kinds: frozenset[Any] | None = None
    #: Whether ``defaults:`` may set it (nodes inherit it).
    inherit: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def default_value(self) -> Any:
        """The parsed default (None when there is none)."""
        if self.default is REQUIRED or self.default is None:
            return None
        if isinstance(self.type, ObjectType):
            return self.type.spec.resolve([])
        return self.type.convert(self.default, _DETACHED)

    def default_text(self) -> str:
        if self.required:
            return "required"
        if self.default_doc is not None:
            return self.default_doc
        if isinstance(self.type, ObjectType):
            return "see below"
        return yaml_text(self.default)

    def type_specs(self) -> Iterator[ObjectSpec]:
        """The object specs nested in this field's type."""
        return _specs_of(self.type)

    def kinds_text(self) -> str:
        return "" if self.kinds is None else "/".join(sorted(k.value for k in self.kinds))


def yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


@dataclass
class Parsed:
    """A mapping read against an :class:`ObjectSpec`: the fields present, with cursors."""

    spec: ObjectSpec
    cur: Cursor
    values: dict[str, Any] = field(default_factory=dict)
    cursors: dict[str, Cursor] = field(default_factory=dict)
    #: The discriminator's parsed value (an appliance's kind), if any and valid.
    kind: Any = None

    def has(self, name: str) -> bool:
        """Present and valid."""
        return name in self.values and self.values[name] is not INVALID

    def get(self, name: str, default: Any = None) -> Any:
        return self.values[name] if self.has(name) else default

    def at(self, name: str) -> Cursor:
        """The cursor of a field (the object's own cursor if absent)."""
        return self.cursors.get(name) or self.missing(name)

    def missing(self, name: str) -> Cursor:
        """A cursor naming an absent field, at the object's key."""
        path = f"{self.cur.path}.{name}" if self.cur.path else name
        return Cursor(self.cur.sink, path, self.cur.key_where, self.cur.key_where)


@dataclass(frozen=True)
class ObjectSpec:
    """A mapping with named fields (an appliance, a NIC, the options...)."""

    #: Identifier ($defs key, docs section).
    name: str
    #: Where it appears, for the docs (``appliances.NAME``).
    place: str
    help: str
    fields: tuple[Field, ...]
    #: A field whose value selects the kind-specific fields (``kind``).
    discriminator: str | None = None

    def __post_init__(self) -> None:
        seen: set[tuple[str, Any]] = set()
        for f in self.fields:
            for k in f.kinds or (None,):
                assert (f.name, k) not in seen, f"{self.name}: field {f.name} twice"
                seen.add((f.name, k))

    # ---------------------------------------------------------------- lookups

    @property
    def kind_values(self) -> tuple[Any, ...]:
        """The discriminator's values (e.g. every ApplianceKind), or ()."""
        if self.discriminator is None:
            return ()
        t = self.field(self.discriminator).type
        assert isinstance(t, ChoiceType)
        return tuple(t.to(c) for c in t.choices)

    def field(self, name: str, kind: Any = None) -> Field:
        for f in self.fields_for(kind):
            if f.name == name:
                return f
        raise KeyError(name)

    def fields_for(self, kind: Any) -> list[Field]:
        """The fields an object of that kind has (kind None: the kind-independent ones)."""
        return [f for f in self.fields if f.kinds is None or kind in f.kinds]

    def names(self, kind: Any = None) -> list[str]:
        return sorted({f.name for f in self.fields_for(kind)})

    def derive(self, name: str, place: str, help: str, kind: Any = None) -> ObjectSpec:
        """The spec of ``defaults.X``: the inheritable fields, all optional, no defaults."""
        fields = tuple(replace(f, default=None, default_doc="-", kinds=None)
                       for f in self.fields_for(kind)
                       if f.inherit and (kind is not None or f.kinds is None))
        return ObjectSpec(name, place, help, fields)

    # ---------------------------------------------------------------- parsing

    def parse(self, value: object, cur: Cursor) -> Parsed:
        if not isinstance(value, Mapping):
            raise Invalid(f"expected a mapping ({self.name}), got {show(value)}")
        parsed = Parsed(self, cur)
        kind_known = self.discriminator is None
        if self.discriminator is not None and self.discriminator in value:
            d = self.field(self.discriminator)
            kc = cur.key(value, self.discriminator)
            parsed.values[d.name] = parsed.kind = d.type.parse(value[d.name], kc)
            parsed.cursors[d.name] = kc
            kind_known = parsed.kind is not INVALID
        kind = parsed.kind if kind_known else None
        fields = {f.name: f for f in self.fields_for(kind)}
        for key in value:
            kc = cur.key(value, key)
            if not isinstance(key, str):
                kc.problem(f"expected a field name, got {show(key)}", at_key=True)
                continue
            if key == self.discriminator:
                continue
            f = fields.get(key)
            if f is None:
                self._unknown(key, kc, kind, kind_known)
                continue
            parsed.values[key] = f.type.parse(value[key], kc)
            parsed.cursors[key] = kc
        for f in fields.values():
            if f.required and f.name not in value:
                what = f.type.describe()
                parsed.missing(f.name).problem(f"missing (expected {what})")
        return parsed

    def _unknown(self, key: str, kc: Cursor, kind: Any, kind_known: bool) -> None:
        owners = [f for f in self.fields if f.name == key and f.kinds]
        if owners and not kind_known:
            return  # the kind is wrong or missing: that is the problem reported
        if owners:
            kinds = sorted({k.value for f in owners for k in f.kinds or ()})
            kc.problem(f"only for {self.discriminator} {' or '.join(kinds)} (this one's "
                       f"{self.discriminator} is {kind.value})", at_key=True)
            return
        names = self.names(kind)
        hint = did_you_mean(key, names)
        kc.problem(f"unknown field{hint} (fields here: {one_of(names)})", at_key=True)

    def resolve(self, layers: list[Parsed], kind: Any = None) -> dict[str, Any]:
        """Field values by precedence: the first layer that sets a field wins, else the default.

        Object-valued fields are merged field by field the same way. Values that
        failed to parse, and required fields that are missing, are INVALID (the
        problem was reported already).
        """
        out: dict[str, Any] = {}
        for f in self.fields_for(kind):
            present = [layer for layer in layers if f.name in layer.values]
            if isinstance(f.type, ObjectType):
                subs = [p.values[f.name] for p in present if isinstance(p.values[f.name], Parsed)]
                bad = any(p.values[f.name] is INVALID for p in present)
                out[f.name] = INVALID if bad else f.type.spec.resolve(subs)
            elif present:
                out[f.name] = present[0].values[f.name]
            elif f.required:
                out[f.name] = INVALID  # reported as missing by parse()
            else:
                out[f.name] = f.default_value()
        return out

    # ---------------------------------------------------------------- export

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        ref = {"$ref": f"#/$defs/{self.name}"}
        if self.name in defs:
            return ref
        defs[self.name] = {}  # reserve (recursion)
        if self.discriminator is None:
            defs[self.name] = self._object_schema(self.fields_for(None), defs)
            return ref
        variants = []
        for kind in self.kind_values:
            fields = self.fields_for(kind)
            s = self._object_schema(fields, defs)
            s["properties"][self.discriminator] = {
                **s["properties"][self.discriminator], "const": kind.value}
            s.pop("description", None)
            vname = f"{self.name}-{kind.value}"
            defs[vname] = {"title": f"{self.name} ({kind.value})", **s}
            variants.append({"$ref": f"#/$defs/{vname}"})
        defs[self.name] = {"description": self.help, "type": "object",
                           "required": [self.discriminator], "oneOf": variants}
        return ref

    def _object_schema(self, fields: list[Field], defs: dict[str, Any]) -> dict[str, Any]:
        props: dict[str, Any] = {}
        for f in fields:
            p = dict(f.type.json_schema(defs))
            p["description"] = f.help
            if not f.required and f.default is not None and not isinstance(f.type, ObjectType):
                p["default"] = f.default
            props[f.name] = p
        return {
            "description": self.help,
            "type": "object",
            "properties": props,
            "required": [f.name for f in fields if f.required],
            "additionalProperties": False,
        }

    def walk(self) -> Iterator[ObjectSpec]:
        """This spec and every spec nested in its fields, depth first, each once."""
        seen: set[str] = set()

        def visit(spec: ObjectSpec) -> Iterator[ObjectSpec]:
            if spec.name in seen:
                return
            seen.add(spec.name)
            yield spec
            for f in spec.fields:
                for sub in f.type_specs():
                    yield from visit(sub)

        yield from visit(self)


def _specs_of(t: FieldType) -> Iterator[ObjectSpec]:
    if isinstance(t, ObjectType | Shorthand):
        yield t.spec
    for attr in ("inner", "item", "value"):
        sub = getattr(t, attr, None)
        if isinstance(sub, FieldType):
            yield from _specs_of(sub)
    for sub in getattr(t, "alternatives", ()):
        yield from _specs_of(sub)
    if isinstance(t, Tagged):
        yield from t.variants.values()


# ------------------------------------------------------------------ composite types


class ObjectType(FieldType):
    def __init__(self, spec: ObjectSpec) -> None:
        self.spec = spec

    def accepts(self, value: object) -> bool:
        return isinstance(value, Mapping)

    def parse(self, value: object, cur: Cursor) -> Any:
        try:
            return self.spec.parse(value, cur)
        except Invalid as e:
            cur.problem(str(e))
            return INVALID

    def convert(self, value: object, cur: Cursor) -> Parsed:
        return self.spec.parse(value, cur)

    def describe(self) -> str:
        return f"a mapping: {self.spec.place}"

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return self.spec.json_schema(defs)


class ListType(FieldType):
    """A list (``null`` counts as empty) of at most ``max_items`` items."""

    def __init__(self, item: FieldType, max_items: int, noun: str) -> None:
        self.item, self.max_items, self.noun = item, max_items, noun

    def accepts(self, value: object) -> bool:
        return isinstance(value, list)

    def convert(self, value: object, cur: Cursor) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.expected(value)
        if len(value) > self.max_items:
            cur.item(value, self.max_items).problem(
                f"at most {self.max_items} {self.noun}, got {len(value)}")
        return [self.item.parse(v, cur.item(value, i)) for i, v in enumerate(value)]

    def describe(self) -> str:
        return f"a list of at most {self.max_items} {self.noun}"

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [{"type": "array", "maxItems": self.max_items,
                           "items": self.item.json_schema(defs)}, {"type": "null"}]}


class MapType(FieldType):
    """A mapping from names to objects (``null`` counts as empty)."""

    def __init__(self, key: FieldType, value: FieldType, noun: str) -> None:
        self.key, self.value, self.noun = key, value, noun

    def accepts(self, value: object) -> bool:
        return isinstance(value, Mapping)

    def convert(self, value: object, cur: Cursor) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.expected(value)
        out: dict[str, Any] = {}
        for k in value:
            kc = cur.key(value, k)
            try:
                name = self.key.convert(k, kc)
            except Invalid as e:
                kc.problem(str(e), at_key=True)
                continue
            out[name] = self.value.parse(value[k], kc)
        return out

    def describe(self) -> str:
        return f"a mapping of {self.noun} by name"

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [{"type": "object", "propertyNames": self.key.json_schema(defs),
                           "additionalProperties": self.value.json_schema(defs)},
                          {"type": "null"}]}


class Shorthand(FieldType):
    """A string standing for a mapping of ``spec`` (``sw1``, ``st1/disk-a``)."""

    def __init__(self, spec: ObjectSpec, form: str, split: Callable[[str], dict[str, str] | None],
                 pattern: str) -> None:
        self.spec, self.form, self.split, self.pattern = spec, form, split, pattern

    def accepts(self, value: object) -> bool:
        return isinstance(value, str)

    def convert(self, value: object, cur: Cursor) -> Parsed:
        parts = self.split(value) if isinstance(value, str) else None
        if parts is None:
            raise self.expected(value)
        parsed = Parsed(self.spec, cur)
        for name, text in parts.items():
            sub = replace(cur, path=f"{cur.path}.{name}")
            parsed.values[name] = self.spec.field(name).type.parse(text, sub)
            parsed.cursors[name] = sub
        return parsed

    def describe(self) -> str:
        return f'"{self.form}"'

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "string", "pattern": self.pattern}


@dataclass(frozen=True)
class TaggedValue:
    tag: str
    body: Parsed


class Tagged(FieldType):
    """A mapping with exactly one key naming the variant: ``{ping: {...}}``."""

    def __init__(self, variants: Mapping[str, ObjectSpec], noun: str) -> None:
        self.variants, self.noun = dict(variants), noun

    def accepts(self, value: object) -> bool:
        return isinstance(value, Mapping)

    def convert(self, value: object, cur: Cursor) -> TaggedValue:
        if not isinstance(value, Mapping) or len(value) != 1:
            raise Invalid(f"expected a mapping with one key, the {self.noun} "
                          f"({one_of(self.variants)}), got {show(value)}"
                          + (f" with {len(value)} keys" if isinstance(value, Mapping) else ""))
        (tag,) = value
        kc = cur.key(value, tag)
        spec = self.variants.get(tag) if isinstance(tag, str) else None
        if spec is None:
            hint = did_you_mean(tag, self.variants) if isinstance(tag, str) else ""
            kc.problem(f"unknown {self.noun}{hint} (expected one of {one_of(self.variants)})",
                       at_key=True)
            raise _Reported
        return TaggedValue(tag, spec.parse(value[tag], kc))

    def parse(self, value: object, cur: Cursor) -> Any:
        try:
            return self.convert(value, cur)
        except _Reported:
            return INVALID
        except Invalid as e:
            cur.problem(str(e))
            return INVALID

    def describe(self) -> str:
        return f"a {self.noun}: {one_of(self.variants)}"

    def json_schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"oneOf": [
            {"type": "object", "properties": {tag: spec.json_schema(defs)}, "required": [tag],
             "additionalProperties": False}
            for tag, spec in self.variants.items()]}


class _Reported(Exception):
    """A problem was reported already."""


#: Where schema defaults are parsed (they are YAML values too; paths would be relative to cwd).
_DETACHED = Cursor.root(Sink(Path("<schema>"), Path()))
