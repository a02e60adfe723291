"""Walking a JSON Schema: the subschemas a document can reach, with their JSON pointers, and local $refs.

Only keywords that hold schemas are followed (never `enum`, `const`, `default`, `examples` or
unknown keywords, whose values are data), and `$defs` / `definitions` only through a `$ref`, so
a feature in an unused definition is never reported.
"""

from __future__ import annotations

from urllib.parse import unquote

from mlx_loom.schemas.features import child

SCHEMA_VALUED = ("additionalProperties", "additionalItems", "items", "contains", "propertyNames", "not", "if",
                 "then", "else", "unevaluatedProperties", "unevaluatedItems")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
SCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas", "dependencies")


def resolve(root: object, ref: object) -> tuple[str, object] | None:
    """(pointer, subschema) for a $ref into this document ("#/$defs/a", or the root's own $id + "#/...")."""
    if not isinstance(ref, str) or not isinstance(root, dict) or "#" not in ref:
        return None
    base, frag = ref.split("#", 1)
    if base and base not in (root.get("$id"), root.get("id")):
        return None
    if frag and not frag.startswith("/"):
        return None
    node: object = root
    pointer = ""
    for part in frag[1:].split("/") if frag else ():
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
        pointer = child(pointer, part)
    return pointer, node


def subschemas(pointer: str, node: dict) -> list[tuple[str, object]]:
    """The direct subschemas of `node` (not through $ref), with their pointers."""
    out: list[tuple[str, object]] = []
    for key in SCHEMA_VALUED:
        value = node.get(key)
        if isinstance(value, (dict, bool)):
            out.append((child(pointer, key), value))
    for key in SCHEMA_LISTS:
        value = node.get(key)
        if isinstance(value, list):
            out.extend((child(pointer, key, i), sub) for i, sub in enumerate(value))
    for key in SCHEMA_MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            out.extend((child(pointer, key, name), sub) for name, sub in value.items()
                       if isinstance(sub, (dict, bool)))
    return out


def reachable(root: object, ref_only: bool = False) -> list[tuple[str, dict]]:
    """Every object subschema a document can reach, each once (by identity), root first.

    ref_only: a node with a $ref is only followed through it (drafts 3-7: its siblings are ignored)."""
    seen: set[int] = set()
    found: list[tuple[str, dict]] = []
    todo: list[tuple[str, object]] = [("", root)]
    while todo:
        pointer, node = todo.pop()
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        found.append((pointer, node))
        target = resolve(root, node.get("$ref"))
        if target is not None:
            todo.append(target)
        if not (ref_only and target is not None):
            todo.extend(reversed(subschemas(pointer, node)))
    return found


def facts(root: object, node: object, depth: int = 8) -> list[dict]:
    """Subschemas every instance of `node` must match: itself, its $ref target and allOf members, transitively."""
    out: list[dict] = []
    todo = [(node, depth)]
    while todo:
        cur, d = todo.pop()
        if not isinstance(cur, dict) or d < 0 or any(cur is seen for seen in out):
            continue
        out.append(cur)
        target = resolve(root, cur.get("$ref"))
        if target is not None:
            todo.append((target[1], d - 1))
        members = cur.get("allOf")
        if isinstance(members, list):
            todo.extend((sub, d - 1) for sub in members)
    return out


_DATA_KEYS = ("enum", "const", "default", "examples", "required")


def unfold(root: object, depth: int) -> object:
    """`root` with every $ref replaced by a copy of its target, `depth` levels deep, and by {} (anything)
    below that: no $ref is left, so nothing is circular. Looser than `root` once depth runs out; best
    effort only (the grammar engine cannot intersect schemas through a circular $ref)."""
    def walk(node: object, left: int) -> object:
        if isinstance(node, list):
            return [walk(x, left) for x in node]
        if not isinstance(node, dict):
            return node
        if isinstance(node.get("$ref"), str):
            target = resolve(root, node["$ref"])
            if target is None or left <= 0:
                return {}
            rest = {k: walk(v, left) for k, v in node.items() if k not in ("$ref", "definitions", "$defs")}
            inner = walk(target[1], left - 1)
            return {"allOf": [inner, rest]} if rest else inner
        return {k: v if k in _DATA_KEYS else walk(v, left) for k, v in node.items()
                if k not in ("definitions", "$defs")}
    return walk(root, depth)
