"""Schema shapes no grammar can generate, found before any grammar work (pure Python).

A JSON Schema whose instance must contain another instance of itself (a required property,
an `allOf` member or a `$ref` that leads back to the same subschema) has no finite instance; a
`$ref` chain that only ever points at other `$ref`s has no instance at all. llguidance only
notices either one while generating (a parser limit, or an empty document), so these are
refused up front with a message naming the loop. The check is sound, not complete: only edges
every instance must take are followed (a `required` property of a schema whose only type is
"object", the first `minItems` items of a schema whose only type is "array", `allOf`, `$ref`,
an `anyOf`/`oneOf` with one alternative);
what it misses, the backend's dry run and limits still catch.
"""

from __future__ import annotations

from urllib.parse import unquote

from mlx_loom.schemas.refs import resolve

# Keywords whose value maps names to subschemas (a property named "$ref" is not a reference).
_SCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas", "$defs", "definitions")
# Keywords whose value is data, not a subschema.
_DATA = ("enum", "const", "default", "examples", "required", "type", "$comment", "description", "title")


def recursion_problem(schema: object) -> str | None:
    """Why `schema` has no finite instance (a short message naming the loop), or None."""
    if not isinstance(schema, dict):
        return None
    nodes = _reachable(schema)
    edges = {ptr: _must(schema, node, ptr) for ptr, node in nodes.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in nodes:
        if state.get(start):
            continue
        path: list[tuple[str, str]] = [(start, "")]  # (pointer, keyword that led here)
        stack = [iter(edges[start])]
        state[start] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()[0]] = 2
                stack.pop()
                continue
            nxt, via = step
            if state.get(nxt) == 1:
                loop = [p for p, _ in path[[p for p, _ in path].index(nxt):]] + [nxt]
                kinds = {v for _, v in path[[p for p, _ in path].index(nxt) + 1:]} | {via}
                return _describe(loop, kinds)
            if state.get(nxt) is None and nxt in edges:
                state[nxt] = 1
                path.append((nxt, via))
                stack.append(iter(edges[nxt]))
    return None


def _describe(loop: list[str], kinds: set[str]) -> str:
    chain = " -> ".join(loop)
    if len(chain) > 90:  # keep the message short: the first pointers name the loop
        chain = chain[:84].rstrip() + " -> ..."
    if kinds <= {"$ref", "allOf"}:
        return f"the JSON schema has no valid instance: its $ref chain loops ({chain}); point the $ref at a real schema"
    return (f"the JSON schema has no finite instance: every instance must contain itself again ({chain}); "
            "make the recursive property optional or give it a non-recursive alternative")


def _resolve(root: dict, ref: object) -> tuple[str, object] | None:
    """(pointer, subschema) for a local JSON-pointer $ref ("#", "#/$defs/a"); None otherwise."""
    if not isinstance(ref, str) or not ref.startswith("#") or (len(ref) > 1 and ref[1] != "/"):
        return None
    hit = resolve(root, ref)
    return (_norm(ref), hit[1]) if hit is not None and isinstance(hit[1], dict) else None


def _norm(ref: str) -> str:
    return "#" + "/".join(unquote(p) for p in ref[1:].split("/")) if len(ref) > 1 else "#"


def _child(ptr: str, *parts: object) -> str:
    return ptr + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _reachable(root: dict) -> dict[str, dict]:
    """Every subschema reachable from the root (by pointer); $defs only through a $ref."""
    found: dict[str, dict] = {}
    todo: list[tuple[str, object]] = [("#", root)]
    while todo:
        ptr, node = todo.pop()
        if not isinstance(node, dict) or ptr in found:
            continue
        found[ptr] = node
        for key, value in node.items():
            if key in _DATA or key in ("$defs", "definitions"):
                continue
            if key == "$ref":
                target = _resolve(root, value)
                if target is not None:
                    todo.append(target)
            elif key in _SCHEMA_MAPS and isinstance(value, dict):
                todo.extend((_child(ptr, key, name), sub) for name, sub in value.items())
            elif isinstance(value, dict):
                todo.append((_child(ptr, key), value))
            elif isinstance(value, list):
                todo.extend((_child(ptr, key, i), sub) for i, sub in enumerate(value))
    return found


def _only_type(node: dict) -> str | None:
    t = node.get("type")
    if isinstance(t, list) and len(t) == 1:
        t = t[0]
    return t if isinstance(t, str) else None


def _must(root: dict, node: dict, ptr: str) -> list[tuple[str, str]]:
    """The subschemas every instance of `node` must also contain or match: (pointer, keyword)."""
    out: list[tuple[str, str]] = []
    target = _resolve(root, node.get("$ref"))
    if target is not None:
        out.append((target[0], "$ref"))
    for i, sub in enumerate(node.get("allOf") or ()):
        if isinstance(sub, dict):
            out.append((_child(ptr, "allOf", i), "allOf"))
    for key in ("anyOf", "oneOf"):  # a single alternative is no alternative
        subs = node.get(key)
        if isinstance(subs, list) and len(subs) == 1 and isinstance(subs[0], dict):
            out.append((_child(ptr, key, 0), "allOf"))
    kind = _only_type(node)
    props = node.get("properties")
    if kind == "object" and isinstance(props, dict):
        for name in node.get("required") or ():
            if isinstance(name, str) and isinstance(props.get(name), dict):
                out.append((_child(ptr, "properties", name), "required"))
    min_items = node.get("minItems")
    if kind == "array" and isinstance(min_items, int) and not isinstance(min_items, bool) and min_items > 0:
        prefix = node.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        for i, sub in enumerate(prefix[:min_items]):
            if isinstance(sub, dict):
                out.append((_child(ptr, "prefixItems", i), "items"))
        if min_items > len(prefix) and isinstance(node.get("items"), dict):
            out.append((_child(ptr, "items"), "items"))
    return out


_STRING_LIMITS = ("pattern", "minLength", "maxLength")


def string_constraints(schema: object) -> list[dict]:
    """Each distinct string constraint reachable in `schema` as a schema of its own
    ({"type": "string", "pattern": ..., "minLength": ...}; property-name patterns too), so the
    backend can try each one alone: a string deep inside an object is only lexed once the
    generation reaches it, long after a whole-schema dry run."""
    if not isinstance(schema, dict):
        return []
    seen: dict[str, dict] = {}
    for node in _reachable(schema).values():
        own = {k: node[k] for k in _STRING_LIMITS if k in node}
        pattern_props = node.get("patternProperties")
        names = [{"pattern": k} for k in pattern_props] if isinstance(pattern_props, dict) else []
        for found in ([own] if own else []) + names:
            if isinstance(found.get("pattern", ""), str):
                key = repr(sorted(found.items()))
                seen.setdefault(key, {"type": "string", **found})
    return list(seen.values())
