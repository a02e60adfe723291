"""The exact complement of a simple subschema, in keywords the grammar engine enforces.

Used to rewrite `not` and the `else` side of `if`/`then`/`else`. A schema is the conjunction of
its keywords, so its complement is the union of each keyword's complement; each keyword form
handled below has an exact complement (non-objects satisfy `required` and `properties`, non-strings
`minLength`, and so on, so those complements only hold objects, strings, ...). Anything else
(patterns, $ref, integer-vs-number, sets of free strings) returns None: not expressible, never an
approximation, so a rewrite built on it is exact.
"""

from __future__ import annotations

import json

ANNOTATIONS = frozenset({"title", "description", "$comment", "default", "examples", "deprecated", "readOnly",
                         "writeOnly", "$id", "$schema"})
TYPES = ("null", "boolean", "object", "array", "number", "string")
_BOUNDS = {  # keyword -> (type it constrains, complement keyword, how the bound shifts)
    "minimum": ("number", "exclusiveMaximum", 0), "maximum": ("number", "exclusiveMinimum", 0),
    "exclusiveMinimum": ("number", "maximum", 0), "exclusiveMaximum": ("number", "minimum", 0),
    "minLength": ("string", "maxLength", -1), "maxLength": ("string", "minLength", 1),
    "minItems": ("array", "maxItems", -1), "maxItems": ("array", "minItems", 1),
}
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")
NEVER = False
"""The schema with no instance."""


def negate(schema: object, domains: dict | None = None) -> object | None:
    """A schema matching exactly the instances `schema` does not match, or None.

    domains: property name -> the property's schema where the negated schema is used (the node's
    own `properties`), so `{"const": "a"}` under a property whose schema is an enum negates to the
    enum's other values."""
    if isinstance(schema, bool):
        return NEVER if schema else {}
    if not isinstance(schema, dict):
        return None
    parts = []
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        part = _negate_keyword(key, value, schema, domains or {})
        if part is None:
            return None
        parts.append(part)
    if not parts:
        return NEVER
    return parts[0] if len(parts) == 1 else {"anyOf": parts}


def _negate_keyword(key: str, value: object, schema: dict, domains: dict) -> object | None:
    if key == "type":
        return _not_type(value)
    if key == "const":
        return _not_values([value], None)
    if key == "enum" and isinstance(value, list):
        return _not_values(value, None)
    if key == "required" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        branches = [{"type": "object", "properties": {name: False}} for name in value]
        return NEVER if not branches else branches[0] if len(branches) == 1 else {"anyOf": branches}
    if key == "properties" and isinstance(value, dict):
        return _not_properties(value, domains)
    if key in _BOUNDS and _is_number(value):
        return _not_bound(key, value)
    if key == "not":
        return value if isinstance(value, (dict, bool)) else None
    if key == "anyOf" and isinstance(value, list):
        negs = [negate(sub, domains) for sub in value]
        return None if any(n is None for n in negs) else {"allOf": negs}
    if key == "allOf" and isinstance(value, list):
        negs = [negate(sub, domains) for sub in value]
        return None if any(n is None for n in negs) else {"anyOf": negs} if negs else NEVER
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _not_type(value: object) -> object | None:
    named = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if named is None or not all(t in TYPES or t == "integer" for t in named):
        return None
    if "integer" in named and "number" not in named:
        return None  # the complement holds 1.5 but not 1: no keyword says "not an integer"
    rest = [t for t in TYPES if t not in named]
    return {"type": rest} if rest else NEVER


def type_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if _is_number(value):
        return "number"
    return {str: "string", dict: "object", list: "array"}[type(value)]


def _not_values(values: list, domain: object) -> object | None:
    """Instances equal to none of `values`: every other type whole, and the rest of each type present."""
    by_type: dict[str, list] = {}
    for v in values:
        by_type.setdefault(type_of(v), []).append(v)
    branches: list[object] = []
    other = [t for t in TYPES if t not in by_type]
    if other:
        branches.append({"type": other})
    for kind, vals in by_type.items():
        rest = _rest_of_type(kind, vals)
        if rest is None:
            return None
        if rest is not NEVER:
            branches.append(rest)
    if not branches:
        return NEVER
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def _rest_of_type(kind: str, vals: list) -> object | None:
    """Instances of `kind` equal to none of `vals` (None: not expressible)."""
    if kind == "null":
        return NEVER
    if kind == "boolean":
        rest = [b for b in (False, True) if b not in vals]
        return {"enum": rest} if rest else NEVER
    if kind == "number":
        cuts = sorted(set(vals))
        ranges = [{"type": "number", "exclusiveMaximum": cuts[0]}, {"type": "number", "exclusiveMinimum": cuts[-1]}]
        ranges += [{"type": "number", "exclusiveMinimum": a, "exclusiveMaximum": b} for a, b in zip(cuts, cuts[1:])]
        return {"anyOf": ranges}
    if kind == "string" and len(vals) == 1:
        return {"type": "string", "pattern": not_literal_pattern(vals[0])}
    return None  # several strings, objects, arrays


def not_literal_pattern(text: str) -> str:
    """A regex (no look-around) matching every string except `text`: another length, or a first difference."""
    n = len(text)
    alts = [r"[\s\S]{%d,}" % (n + 1)]
    if n:
        alts.append(r"[\s\S]{0,%d}" % (n - 1))
    for i, ch in enumerate(text):
        tail = r"[\s\S]{%d}" % (n - i - 1) if n - i - 1 else ""
        alts.append(_escape(text[:i]) + "[^" + _escape(ch) + "]" + tail)
    return "^(?:" + "|".join(alts) + ")$"


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _not_properties(props: dict, domains: dict) -> object | None:
    """An object with some listed property present whose value fails that property's schema."""
    branches = []
    for name, sub in props.items():
        neg = _negate_within(sub, domains.get(name))
        if neg is None:
            return None
        if neg is not NEVER:
            branches.append({"type": "object", "required": [name], "properties": {name: neg}})
    if not branches:
        return NEVER
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def _negate_within(sub: object, domain: object) -> object | None:
    """negate(sub), but inside a known finite domain (an enum/const property) as the domain's other values."""
    values = _finite(domain)
    mine = _finite(sub) if isinstance(sub, dict) and set(sub) - ANNOTATIONS <= {"const", "enum"} else None
    if values is not None and mine is not None:
        keys = {canonical(v) for v in mine}
        return {"enum": [v for v in values if canonical(v) not in keys]} if any(
            canonical(v) not in keys for v in values) else NEVER
    return negate(sub)


def _finite(schema: object) -> list | None:
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return [schema["const"]]
    enum = schema.get("enum")
    return enum if isinstance(enum, list) else None


def canonical(value: object) -> str:
    """JSON Schema equality: 1 == 1.0, True != 1, key order does not matter."""
    def norm(v: object) -> object:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v
    return json.dumps(norm(value), sort_keys=True)


def _not_bound(key: str, value: float) -> object | None:
    kind, other, shift = _BOUNDS[key]
    if kind == "number":
        return {"type": "number", other: value}
    if not isinstance(value, int):
        return None
    return NEVER if value + shift < 0 else {"type": kind, other: value + shift}
