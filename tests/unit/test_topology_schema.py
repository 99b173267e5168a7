"""The topology schema's generated outputs (JSON Schema, printed docs) and fuzzing the loader.

The JSON Schema is checked with the ``jsonschema`` package when it is
installed, and otherwise with the small draft 2020-12 subset validator below
(the keywords ``json_schema()`` emits); either way every shipped example must
validate and typical mistakes must not.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from vvu_runtime.launch.topology import (
    ApplianceKind,
    CheckKind,
    Topology,
    TopologyError,
    json_schema,
    load_topology_text,
    schema_text,
)
from vvu_runtime.launch.topology.schema import TOPOLOGY
from vvu_runtime.launch.topology.spec import REQUIRED

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def plain(path: Path) -> Any:
    """A YAML file as plain JSON data (what an editor validates)."""
    return json.loads(json.dumps(YAML(typ="safe").load(path.read_text())))


# ------------------------------------------------------------------ a draft 2020-12 subset


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    assert ref.startswith("#/"), ref
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def subset_errors(value: Any, schema: dict[str, Any], root: dict[str, Any],
                  path: str = "$") -> Iterator[str]:
    """Errors of ``value`` against ``schema`` (only the keywords json_schema() uses)."""
    known = {"$schema", "$id", "$defs", "title", "description", "default", "format", "$ref",
             "type", "properties", "required", "additionalProperties", "propertyNames", "enum",
             "const", "pattern", "minimum", "maximum", "minLength", "maxItems", "items",
             "anyOf", "oneOf"}
    assert set(schema) <= known, set(schema) - known
    if "$ref" in schema:
        yield from subset_errors(value, _resolve(schema["$ref"], root), root, path)
    if "type" in schema and not _is_type(value, schema["type"]):
        yield f"{path}: not {schema['type']}"
        return
    if "enum" in schema and value not in schema["enum"]:
        yield f"{path}: not in {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        yield f"{path}: not {schema['const']!r}"
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            yield f"{path}: does not match {schema['pattern']}"
        if len(value) < schema.get("minLength", 0):
            yield f"{path}: too short"
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            yield f"{path}: below {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            yield f"{path}: above {schema['maximum']}"
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            yield f"{path}: too many items"
        if "items" in schema:
            for i, item in enumerate(value):
                yield from subset_errors(item, schema["items"], root, f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                yield f"{path}: {key} missing"
        for key, item in value.items():
            if "propertyNames" in schema:
                yield from subset_errors(key, schema["propertyNames"], root, f"{path}.<{key}>")
            if key in props:
                yield from subset_errors(item, props[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                yield f"{path}.{key}: not allowed"
            elif isinstance(schema.get("additionalProperties"), dict):
                yield from subset_errors(item, schema["additionalProperties"], root,
                                         f"{path}.{key}")
    for word, want in (("anyOf", (1, None)), ("oneOf", (1, 1))):
        if word in schema:
            ok = sum(not list(subset_errors(value, s, root, path)) for s in schema[word])
            if ok < want[0] or (want[1] is not None and ok > want[1]):
                yield f"{path}: {ok} of the {word} alternatives match"


def schema_errors(value: Any) -> list[str]:
    schema = json_schema()
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:
        return list(subset_errors(value, schema, schema))
    validator = jsonschema.Draft202012Validator(schema)
    return [e.message for e in validator.iter_errors(value)]


# ------------------------------------------------------------------ JSON Schema


def test_json_schema_is_draft_2020_12_and_plain_json() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert json.loads(json.dumps(schema)) == schema
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == ["name"]
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.Draft202012Validator.check_schema(schema)


def _object_schemas(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "properties" in node:
            yield node
        for v in node.values():
            yield from _object_schemas(v)
    elif isinstance(node, list):
        for v in node:
            yield from _object_schemas(v)


def test_every_object_is_closed_and_every_field_described() -> None:
    objects = list(_object_schemas(json_schema()))
    assert len(objects) > 15
    for obj in objects:
        if len(obj["properties"]) == 1 and obj["required"] == list(obj["properties"]):
            # a check: {ping: {...}}
            assert obj["additionalProperties"] is False
            continue
        assert obj["additionalProperties"] is False, obj
        for name, prop in obj["properties"].items():
            assert prop.get("description"), name


def test_appliance_kinds_are_variants() -> None:
    defs = json_schema()["$defs"]
    variants = [_resolve(v["$ref"], {"$defs": defs}) for v in defs["appliance"]["oneOf"]]
    assert [v["properties"]["kind"]["const"] for v in variants] == [k.value for k in
                                                                    ApplianceKind]
    vswitch, storage, fs = variants
    assert "subnet" in vswitch["properties"] and "exports" not in vswitch["properties"]
    assert "exports" in storage["properties"] and "subnet" not in storage["properties"]
    assert fs["properties"]["exports"]["anyOf"][0]["items"]["$ref"].endswith("/fs-export")
    assert fs["properties"]["options"]["$ref"].endswith("/fs-options")
    assert set(vswitch["properties"]["options"]["$ref"].split("/")[-1:]) == {"vswitch-options"}


def test_defaults_come_from_the_table() -> None:
    defs = json_schema()["$defs"]
    assert defs["consumer"]["properties"]["memory"]["default"] == "512M"
    assert defs["options"]["properties"]["accel"]["default"] == "auto"
    assert defs["options"]["properties"]["accel"]["enum"] == ["auto", "kvm", "tcg"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_against_the_json_schema(path: Path) -> None:
    assert schema_errors(plain(path)) == []


@pytest.mark.parametrize("change", [
    lambda d: d.update(bogus=1),
    lambda d: d["consumers"]["c1"].update(memroy="1G"),
    lambda d: d["appliances"]["sw1"].update(exports=[]),
    lambda d: d["appliances"]["st1"].update(kind="nfs"),
    lambda d: d["appliances"]["st1"].pop("kind"),
    lambda d: d["options"].update(accel="kvn"),
    lambda d: d["appliances"]["st1"]["exports"][0].update(protocol="nvme"),
    lambda d: d["appliances"]["sw1"].update(protocol="scsi"),
    lambda d: d["consumers"]["c1"].update(cpus=17),
    lambda d: d["consumers"]["c1"].update(memory="512"),
    lambda d: d["consumers"]["c1"]["nics"].append({"switch": "sw1", "mtu": 9000}),
    lambda d: d["consumers"]["c1"]["disks"].append("st1"),
    lambda d: d["checks"].append({"pong": {"from": "c1", "to": "c2"}}),
    lambda d: d["checks"].append({"ping": {"from": "c1"}}),
    lambda d: d.update(consumers={"C1": {}}),
    lambda d: d["consumers"]["c1"].update(nics=["sw1"] * 9),
], ids=lambda f: "")
def test_json_schema_rejects_what_the_loader_rejects(change: Any) -> None:
    data = plain(ROOT / "examples" / "default.yaml")
    change(data)
    assert schema_errors(data)
    text = io.StringIO()
    YAML(typ="safe").dump(data, text)
    with pytest.raises(TopologyError):
        load_topology_text(text.getvalue(), Path("changed.yaml"))


# ------------------------------------------------------------------ printed docs


def test_schema_text_has_a_table_per_object_and_a_row_per_field() -> None:
    text = schema_text()
    specs = list(TOPOLOGY.walk())
    assert len(specs) >= 15
    for spec in specs:
        assert f"## {spec.place}\n" in text
        for f in spec.fields:
            assert re.search(rf"^\| {re.escape(f.name)} \| ", text, re.M), f.name
    assert "| memory | a power of two size 128M..16G" in text
    assert "counts MiB" in text  # bare integers are MiB, said once for all sizes
    for kind in CheckKind:
        assert f"## checks[].{kind.value}\n" in text
    assert re.search(r"^\| protocol \| one of blk, scsi \| blk \| .*vhost-user-scsi-pci", text,
                     re.M), text


def test_every_field_has_help_and_required_fields_have_no_default() -> None:
    for spec in TOPOLOGY.walk():
        assert spec.help
        for f in spec.fields:
            assert f.help, (spec.name, f.name)
            assert f.required or f.default is not REQUIRED


# ------------------------------------------------------------------ fuzzing


_KEYS = sorted({f.name for spec in TOPOLOGY.walk() for f in spec.fields}
               | {"sw1", "st1", "c1", "c2", "nope"})
_WORDS = ["sw1", "st1", "c1", "c2", "st1/disk-a", "vswitch", "storage", "consumer", "1G",
          "512M", "10.10.1.0/24", "10.10.1.5", "52:54:00:12:34:56", "poll", "kvm", "", "x:y"]

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 1 << 41), st.sampled_from(_WORDS),
                     st.text(max_size=8), st.floats(allow_nan=False))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), inner, max_size=5)),
    max_leaves=30)


def _loads_or_topology_error(text: str) -> None:
    try:
        topo = load_topology_text(text, Path("fuzz.yaml"))
    except TopologyError as e:
        assert e.problems
        for p in e.problems:
            assert p.where.line >= 1 and p.where.col >= 1
        return
    assert isinstance(topo, Topology)
    json.dumps(topo.to_json())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6))
def test_fuzz_random_mappings_raise_only_topology_error(data: dict[str, Any]) -> None:
    text = io.StringIO()
    YAML(typ="safe").dump(data, text)
    _loads_or_topology_error(text.getvalue())


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fuzz_mutated_example_raises_only_topology_error(data: st.DataObject) -> None:
    base = (ROOT / "examples" / "default.yaml").read_text()
    start = data.draw(st.integers(0, len(base)))
    end = data.draw(st.integers(start, min(len(base), start + 20)))
    insert = data.draw(st.sampled_from(["", " ", "\n", ":", "- ", "{", "]", "x", "&a ", "*a",
                                        "sw1", "999", "null", "\t"]))
    _loads_or_topology_error(base[:start] + insert + base[end:])


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_random_text_raises_only_topology_error(text: str) -> None:
    _loads_or_topology_error(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_changed_example_tree_raises_only_topology_error(data: st.DataObject) -> None:
    """Set random fields deep inside the default example (reaches the cross-reference checks)."""
    tree = plain(ROOT / "examples" / "default.yaml")
    for _ in range(data.draw(st.integers(1, 4))):
        node = tree
        for _ in range(data.draw(st.integers(0, 4))):
            if isinstance(node, dict) and node:
                node = node[data.draw(st.sampled_from(sorted(node)))]
            elif isinstance(node, list) and node:
                node = node[data.draw(st.integers(0, len(node) - 1))]
        if isinstance(node, dict):
            node[data.draw(st.sampled_from(_KEYS))] = data.draw(_values)
        elif isinstance(node, list):
            node.append(data.draw(_values))
    text = io.StringIO()
    YAML(typ="safe").dump(tree, text)
    _loads_or_topology_error(text.getvalue())
