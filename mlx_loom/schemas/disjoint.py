"""Proofs that two subschemas share no instance, so a `oneOf` of them is the same as an `anyOf`.

Sound, not complete: "disjoint" is only answered when one of these holds for something both
branches must match (the branch itself, its $ref target, its allOf members):
  - their types do not overlap (from `type`, or the types of `const` / `enum` values);
  - their `const` / `enum` value sets do not overlap, or each value one lists fails the other;
  - both are objects only, and a property one requires is forbidden by the other, or a property
    one requires has disjoint schemas in the two (a discriminator such as {"kind": {"const": "a"}}).
"""

from __future__ import annotations

import json

from mlx_loom.schemas.negate import ANNOTATIONS, canonical, type_of
from mlx_loom.schemas.refs import facts

ALL_TYPES = frozenset({"null", "boolean", "object", "array", "integer", "fraction", "string"})
"""Instance kinds: "number" is integer | fraction, so "integer" and "number" overlap as they should."""
MAX_DEPTH = 3


OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties", "patternProperties",
                             "minProperties", "maxProperties"})


def one_of_is_any_of(root: object, branches: list, within: set[str] | None = None) -> bool:
    """Every pair of branches is provably disjoint on instances of the kinds `within` (None: all)."""
    return all(disjoint(root, a, b, within) for i, a in enumerate(branches) for b in branches[i + 1:])


def types_of(root: object, node: object) -> set[str]:
    """The instance kinds `node` allows, as far as its type/const/enum say."""
    return _types(facts(root, node))


def only_object_keywords(root: object, branch: object) -> bool:
    """`branch` constrains objects alone: every non-object instance matches it."""
    fs = facts(root, branch)
    return bool(fs) and all(set(f) - ANNOTATIONS - {"$ref", "allOf", "definitions", "$defs"} <= OBJECT_KEYWORDS
                            for f in fs)


def disjoint(root: object, a: object, b: object, within: set[str] | None = None, depth: int = MAX_DEPTH) -> bool:
    if a is False or b is False:
        return True
    fa, fb = facts(root, a), facts(root, b)
    if not fa or not fb or depth < 0:
        return False
    common = _types(fa) & _types(fb) & (within if within is not None else ALL_TYPES)
    if not common:
        return True
    va, vb = _values(fa), _values(fb)
    if va is not None and vb is not None and not (va & vb):
        return True
    if _values_fail(fa, fb) or _values_fail(fb, fa):
        return True
    return common <= {"object"} and _objects_disjoint(root, fa, fb, depth)


def _kinds(name: object) -> set[str]:
    if name == "number":
        return {"integer", "fraction"}
    return {name} if name in ALL_TYPES else set(ALL_TYPES)


def _value_kind(value: object) -> str:
    kind = type_of(value)
    if kind == "number":
        return "integer" if float(value).is_integer() else "fraction"
    return kind


def _types(fs: list[dict]) -> set[str]:
    out = set(ALL_TYPES)
    for f in fs:
        t = f.get("type")
        if isinstance(t, str):
            out &= _kinds(t)
        elif isinstance(t, list):
            out &= set().union(*(_kinds(x) for x in t)) if t else set()
        values = _own_values(f)
        if values is not None:
            out &= {_value_kind(v) for v in values}
    return out


def _own_values(f: dict) -> list | None:
    if "const" in f:
        return [f["const"]]
    return f["enum"] if isinstance(f.get("enum"), list) else None


def _values(fs: list[dict]) -> set[str] | None:
    out: set[str] | None = None
    for f in fs:
        values = _own_values(f)
        if values is not None:
            keys = {canonical(v) for v in values}
            out = keys if out is None else out & keys
    return out


def _values_fail(fa: list[dict], fb: list[dict]) -> bool:
    """`a` lists its values (enum/const) and each of them fails some $ref-free fact of `b`."""
    values = next((_own_values(f) for f in fa if _own_values(f) is not None), None)
    if values is None:
        return False
    local = [f for f in fb if "$ref" not in json.dumps(f)]
    return bool(local) and all(any(not _validator(f).is_valid(v) for f in local) for v in values)


def _validator(schema: dict):
    from jsonschema import Draft202012Validator  # the facts are plain keywords: any draft reads them alike
    return Draft202012Validator(schema)


def _objects_disjoint(root: object, fa: list[dict], fb: list[dict], depth: int) -> bool:
    ra, rb = _required(fa), _required(fb)
    if any(_forbids(fb, p) for p in ra) or any(_forbids(fa, p) for p in rb):
        return True
    for name in ra | rb:
        for sa in _property_schemas(fa, name):
            if any(disjoint(root, sa, sb, None, depth - 1) for sb in _property_schemas(fb, name)):
                return True
    return False


def _required(fs: list[dict]) -> set[str]:
    return {n for f in fs if isinstance(f.get("required"), list) for n in f["required"] if isinstance(n, str)}


def _property_schemas(fs: list[dict], name: str) -> list[object]:
    return [f["properties"][name] for f in fs if isinstance(f.get("properties"), dict) and name in f["properties"]]


def _forbids(fs: list[dict], name: str) -> bool:
    """Some fact says an object cannot have property `name`."""
    for f in fs:
        props = f.get("properties") if isinstance(f.get("properties"), dict) else {}
        if props.get(name) is False:
            return True
        if f.get("additionalProperties") is False and name not in props and not f.get("patternProperties"):
            return True
    return False
