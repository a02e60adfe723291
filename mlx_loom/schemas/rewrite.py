"""A client's JSON Schema -> one the grammar engine enforces exactly, plus what it cannot.

Each rewrite below replaces keywords llguidance does not implement by an equivalent form it does
(tests/test_schema_rewrites.py generates documents from the rewritten grammar and validates them
against the original schema):
  - dependentRequired / dependencies (array form): allOf + anyOf[required all, property absent];
    dependentSchemas / dependencies (schema form): anyOf[required + the schema, property absent];
  - if/then/else: anyOf[allOf[if, then], allOf[complement of if, else]] when the complement of `if`
    is expressible (negate.py); `not`: its complement likewise;
  - oneOf whose branches are provably disjoint (disjoint.py): anyOf;
  - uniqueItems over an enum of at most SMALL_ENUM values: the enum of the subsets (in enum order);
    uniqueItems with maxItems <= 1 or false: dropped (always satisfied); over other items (minItems
    <= 1): maxItems 1, which is sound but narrower (listed in Prepared.narrowed);
  - format uri-reference, regex, color, byte: a pattern (features.FORMAT_PATTERNS).
What is left is a list of Problems (JSON pointer, keyword, why). Strict refuses them all at once;
best effort (relax=True) drops each problem keyword, so the grammar allows a superset of the
schema and the finished output is validated instead. Rewrites only add to `allOf`, drop keywords
or rename oneOf in place, so a $ref into the schema keeps pointing at the same subschema.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from mlx_loom.schemas.disjoint import one_of_is_any_of, only_object_keywords, types_of
from mlx_loom.schemas.features import (FORMAT_PATTERNS, LEGACY_DRAFTS, MAX_BRANCHES, NATIVE_FORMATS, SMALL_ENUM,
                                       STANDARD_FORMATS, UNSUPPORTED_KEYWORDS, Problem, child)
from mlx_loom.schemas.negate import ANNOTATIONS, canonical, negate
from mlx_loom.schemas.refs import facts, reachable, resolve

PatternCheck = Callable[[str], "str | None"]
"""A regex -> why the grammar engine cannot use it (None: it can)."""
Edit = Callable[[], None]


@dataclass
class Prepared:
    schema: object
    """The rewritten schema (relax=True: with every problem keyword dropped as well)."""
    problems: list[Problem] = field(default_factory=list)
    """What cannot be enforced exactly (relax=True: what was dropped)."""
    narrowed: list[Problem] = field(default_factory=list)
    """Keywords enforced soundly but by allowing fewer documents than the schema does."""
    unproven_one_of: list[Problem] = field(default_factory=list)
    """oneOfs not proven disjoint here: left as oneOf (llguidance may still prove them itself)."""


def prepare(schema: object, relax: bool = False, pattern_error: PatternCheck | None = None) -> Prepared:
    """Rewrite a copy of `schema`; the client's object is never changed."""
    root = copy.deepcopy(schema)
    out = Prepared(root)
    edits: list[Edit] = []
    nodes = reachable(root, ref_only=legacy_draft(root))
    refs = [n["$ref"] for _, n in nodes if isinstance(n.get("$ref"), str)]
    # Plan every node against the untouched schema first (proofs and complements read it); drop what
    # is relaxed while the problems' pointers still name it; then edit.
    for pointer, node in nodes:
        _plan(root, pointer, node, out, edits, pattern_error, refs)
    if relax:
        for problem in out.problems:
            _drop(root, problem)
    for edit in edits:
        edit()
    return out


def _plan(root: object, ptr: str, node: dict, out: Prepared, edits: list[Edit],
          pattern_error: PatternCheck | None, refs: list[str]) -> None:
    problems = out.problems
    if "$ref" in node and _plan_ref_siblings(root, node, edits):
        return  # only the $ref counts here (its target is planned on its own)
    _plan_redundant_type(root, node, edits)
    _plan_dependencies(ptr, node, problems, edits)
    _plan_conditional(ptr, node, problems, edits)
    _plan_not(ptr, node, problems, edits)
    _plan_unique(root, ptr, node, out, edits)
    _plan_format(ptr, node, problems, edits)
    _plan_one_of(root, ptr, node, out, edits, refs)
    for key in sorted(UNSUPPORTED_KEYWORDS & set(node) - _REWRITTEN):
        problems.append(Problem(child(ptr, key), key, f"'{key}' cannot be enforced by the grammar engine"))
    _plan_property_counts(ptr, node, problems)
    if pattern_error is not None:
        _plan_patterns(ptr, node, problems, pattern_error)


_REWRITTEN = frozenset({"dependencies", "dependentRequired", "dependentSchemas", "if", "then", "else", "not",
                        "uniqueItems"})


def _plan_ref_siblings(root: object, node: dict, edits: list[Edit]) -> bool:
    """Drop the keywords beside a $ref that change nothing: all of them before draft 2019-09 (validators
    ignore them), else annotations and those the target repeats. llguidance refuses any sibling of a
    circular $ref. True: nothing but $ref is left to plan at this node."""
    legacy = legacy_draft(root)
    target = resolve(root, node["$ref"])
    repeated = target[1] if target is not None and isinstance(target[1], dict) else {}
    ignored = [k for k in node if k not in _KEEP_BESIDE_REF and (
        legacy or k in ANNOTATIONS or (k in repeated and canonical(repeated[k]) == canonical(node[k])))]
    if ignored:
        edits.append(_pop(node, *ignored))
    return legacy


def legacy_draft(root: object) -> bool:
    """The schema declares a draft (3-7) in which the keywords beside a $ref are ignored."""
    schema_uri = root.get("$schema") if isinstance(root, dict) else None
    return isinstance(schema_uri, str) and any(d in schema_uri for d in LEGACY_DRAFTS)


_KEEP_BESIDE_REF = frozenset({"$ref", "definitions", "$defs"})  # other $refs may point into definitions


def _plan_redundant_type(root: object, node: dict, edits: list[Edit]) -> None:
    """Drop a `type` beside anyOf/oneOf that every branch already implies: llguidance would have to
    intersect it with each branch, which it cannot do through a circular $ref."""
    branches = node.get("anyOf", node.get("oneOf"))
    if "type" not in node or not isinstance(branches, list) or not branches or set(node) & _REWRITTEN:
        return
    mine = types_of(root, {"type": node["type"]})
    if all(types_of(root, b) <= mine for b in branches):
        edits.append(_pop(node, "type"))


def _add_all_of(node: dict, *schemas: object) -> Edit:
    def edit() -> None:
        node.setdefault("allOf", []).extend(schemas)
    return edit


def _pop(node: dict, *keys: str) -> Edit:
    def edit() -> None:
        for key in keys:
            node.pop(key, None)
    return edit


def _plan_dependencies(ptr: str, node: dict, problems: list[Problem], edits: list[Edit]) -> None:
    added: list[object] = []
    for key in ("dependentRequired", "dependentSchemas", "dependencies"):
        deps = node.get(key)
        if deps is None:
            continue
        if not isinstance(deps, dict):
            problems.append(Problem(child(ptr, key), key, f"'{key}' must map property names to lists or schemas"))
            continue
        for name, dep in deps.items():
            if isinstance(dep, list) and all(isinstance(d, str) for d in dep):
                then: object = {"required": [name, *dep]}
            elif isinstance(dep, (dict, bool)):
                then = {"allOf": [{"required": [name]}, dep]}
            else:
                problems.append(Problem(child(ptr, key, name), key, "a dependency must be a list of names or a schema"))
                continue
            added.append({"anyOf": [then, {"properties": {name: False}}]})
        edits.append(_pop(node, key))
    if len(added) > MAX_BRANCHES.bit_length() + 2:  # 2^n alternatives once the grammar expands them
        problems.append(Problem(child(ptr, "dependencies"), "dependencies", f"{len(added)} property dependencies "
                                "on one object are too many alternatives to enforce exactly"))
    elif added:
        edits.append(_add_all_of(node, *added))


def _plan_conditional(ptr: str, node: dict, problems: list[Problem], edits: list[Edit]) -> None:
    if not any(k in node for k in ("if", "then", "else")):
        return
    edits.append(_pop(node, "if", "then", "else"))
    cond, then, other = node.get("if"), node.get("then", True), node.get("else", True)
    if "if" not in node or (then is True and other is True):
        return  # without `if`, or with neither branch, the keywords constrain nothing
    domains = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    neg = negate(cond, domains)
    if neg is None:
        problems.append(Problem(child(ptr, "if"), "if", "the 'if' condition has no expressible complement (only "
                                "type, const, enum of one string or of numbers, required, properties of those, "
                                "and bounds are)"))
        return
    then, other = ({} if x is True else x for x in (then, other))  # an absent branch allows everything
    edits.append(_add_all_of(node, {"anyOf": [{"allOf": [cond, then]}, {"allOf": [neg, other]}]}))


def _plan_not(ptr: str, node: dict, problems: list[Problem], edits: list[Edit]) -> None:
    if "not" not in node:
        return
    domains = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    neg = negate(node["not"], domains)
    if neg is None:
        problems.append(Problem(child(ptr, "not"), "not", "this 'not' has no expressible complement (only type, "
                                "const, enum of one string or of numbers, required, properties of those, and "
                                "bounds are)"))
        return
    edits.extend((_pop(node, "not"), _add_all_of(node, neg)))


def _plan_unique(root: object, ptr: str, node: dict, out: Prepared, edits: list[Edit]) -> None:
    problems = out.problems
    if "uniqueItems" not in node:
        return
    max_items = node.get("maxItems")
    if node["uniqueItems"] is not True or (isinstance(max_items, int) and max_items <= 1):
        edits.append(_pop(node, "uniqueItems"))  # nothing to enforce
        return
    values = _item_values(root, node)
    lo = node.get("minItems", 0) if isinstance(node.get("minItems"), int) else 0
    if values is None or len(values) > SMALL_ENUM or "enum" in node or "const" in node:
        if lo > 1 or "prefixItems" in node or isinstance(node.get("items"), list):
            problems.append(Problem(child(ptr, "uniqueItems"), "uniqueItems", "uniqueItems can only be enforced "
                                    f"over items that are an enum of at most {SMALL_ENUM} values, or with at most "
                                    "one item"))
            return
        # Sound but narrower: an array of at most one item never repeats one (README: "narrowed").
        out.narrowed.append(Problem(child(ptr, "uniqueItems"), "uniqueItems", "uniqueItems over items that are not "
                                    "a small enum: at most one item is generated"))
        edits.extend((_pop(node, "uniqueItems"), lambda: node.__setitem__("maxItems", 1)))
        return
    hi = max_items if isinstance(max_items, int) else len(values)
    subsets = [list(c) for k in range(lo, min(hi, len(values)) + 1) for c in itertools.combinations(values, k)]
    edits.extend((_pop(node, "uniqueItems"), lambda: node.__setitem__("enum", subsets)))


def _item_values(root: object, node: dict) -> list | None:
    """The distinct values an item can take, in schema order, if the items schema lists them."""
    items = node.get("items")
    if not isinstance(items, dict):
        return None
    found = None
    for f in facts(root, items):
        if "const" in f:
            found = [f["const"]]
        elif isinstance(f.get("enum"), list):
            found = f["enum"]
        elif f.get("type") == "boolean" and found is None:
            found = [False, True]
    if found is None:
        return None
    seen: dict[str, object] = {}
    for v in found:
        seen.setdefault(canonical(v), v)
    return list(seen.values())


def _plan_format(ptr: str, node: dict, problems: list[Problem], edits: list[Edit]) -> None:
    fmt = node.get("format")
    kinds = node.get("type")
    if not isinstance(fmt, str) or fmt in NATIVE_FORMATS:
        return
    if kinds is not None and "string" not in (kinds if isinstance(kinds, list) else [kinds]):
        return  # a string format on a non-string: validators ignore it, and so does the grammar
    pattern = FORMAT_PATTERNS.get(fmt)
    if pattern is None and fmt not in STANDARD_FORMATS:
        edits.append(_pop(node, "format"))  # a custom format is an annotation (see STANDARD_FORMATS)
        return
    if pattern is None:
        problems.append(Problem(child(ptr, "format"), "format", f"format '{fmt}' cannot be enforced (enforced: "
                                f"{', '.join(sorted(NATIVE_FORMATS | set(FORMAT_PATTERNS)))})"))
        return
    edits.append(_pop(node, "format"))
    if kinds == "string" and "pattern" not in node:
        edits.append(lambda: node.__setitem__("pattern", pattern))
    else:  # `pattern` constrains strings only, like `format`
        edits.append(_add_all_of(node, {"pattern": pattern}))


def _plan_one_of(root: object, ptr: str, node: dict, out: Prepared, edits: list[Edit], refs: list[str]) -> None:
    """Provably disjoint branches: rename to anyOf. Else, if every branch has an expressible complement:
    anyOf[branch i and the complement of every other branch] (exactly one matches)."""
    branches = node.get("oneOf")
    if not isinstance(branches, list):
        return
    inside = "#" + child(ptr, "oneOf") + "/"
    within = types_of(root, {k: v for k, v in node.items() if k in ("type", "enum", "const")})
    objects_only = "type" not in node and len(branches) > 1 and all(only_object_keywords(root, b) for b in branches)
    if objects_only:  # every non-object matches every branch, so none matches exactly one
        within = {"object"}
    alternatives: list = branches
    if not one_of_is_any_of(root, branches, within):
        negs = [negate(b) for b in branches] if len(branches) <= 4 else [None]
        if any(n is None for n in negs):
            alternatives = []
        else:
            alternatives = [{"allOf": [b, *(n for j, n in enumerate(negs) if j != i)]} for i, b in enumerate(branches)]
    if not alternatives or any(inside in ref + "/" for ref in refs):
        out.unproven_one_of.append(Problem(child(ptr, "oneOf"), "oneOf", "oneOf branches that may overlap "
                                           "cannot be enforced (exactly one must match)"))
        return

    def edit() -> None:
        node.pop("oneOf")
        if objects_only:
            node["type"] = "object"
        if "anyOf" in node:
            node.setdefault("allOf", []).append({"anyOf": alternatives})
        else:
            node["anyOf"] = alternatives
    edits.append(edit)


def _plan_property_counts(ptr: str, node: dict, problems: list[Problem]) -> None:
    lo, hi = node.get("minProperties", 0), node.get("maxProperties")
    if (not isinstance(lo, int) or lo <= 0) and hi is None:
        return
    props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    required = set(node.get("required") or ()) if isinstance(node.get("required"), list) else set()
    closed = node.get("additionalProperties") is False and not node.get("patternProperties")
    if not closed and not set(props) <= required:
        key = "minProperties" if isinstance(lo, int) and lo > 0 else "maxProperties"
        problems.append(Problem(child(ptr, key), key, f"'{key}' is only enforced when every listed property is "
                                "required or additionalProperties is false"))


def _plan_patterns(ptr: str, node: dict, problems: list[Problem], pattern_error: PatternCheck) -> None:
    if isinstance(node.get("pattern"), str):
        why = pattern_error(node["pattern"])
        if why:
            problems.append(Problem(child(ptr, "pattern"), "pattern", why))
    names = node.get("patternProperties")
    for regex in names if isinstance(names, dict) else ():
        why = pattern_error(regex)
        if why:
            problems.append(Problem(child(ptr, "patternProperties", regex), "patternProperties", why))


def _drop(root: object, problem: Problem) -> None:
    """Remove the keyword (or patternProperties entry) a problem names: the grammar then allows more."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in problem.pointer.split("/")[1:]]
    node: object = root
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if not isinstance(node, dict) or not parts:
        return
    node.pop(parts[-1], None)
    if problem.keyword in ("minProperties", "maxProperties"):
        node.pop("minProperties", None)
        node.pop("maxProperties", None)
    if problem.keyword == "if":
        node.pop("then", None)
        node.pop("else", None)
