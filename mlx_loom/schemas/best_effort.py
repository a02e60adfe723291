"""strict: false: the closest grammar the engine can run for any valid JSON Schema, and what it relaxes.

Rungs, first that compiles and passes the dry runs wins:
  1. the rewritten schema with every unenforceable keyword dropped (rewrite.prepare(relax=True));
     if it has oneOfs rewrite.py could not prove disjoint and llguidance cannot either, again with
     them read as anyOf (llguidance's coerce_one_of);
  2. the same with llguidance's `lenient` option (it ignores what it still cannot compile);
  3. the schema with its $refs inlined 3, 2 or 1 levels deep and anything below (llguidance cannot
     intersect schemas through a circular $ref), if that stays small enough to compile;
  4. any JSON value of the schema's root type (any JSON at all when the root type is not one name).
Each relaxation is listed ("pointer: why"), the finished output is validated against the client's
schema (mlx_loom/server/structured.py), and a failure is reported on the choice. Only a schema that
is not valid JSON Schema (its metaschema says so) is refused.
"""

from __future__ import annotations

import json
import logging
from typing import Protocol

from mlx_loom.schemas.grammar import GrammarError, short_error
from mlx_loom.schemas.refs import reachable, resolve, unfold
from mlx_loom.schemas.rewrite import PatternCheck, Prepared, prepare
from mlx_loom.schemas.schema_checks import recursion_problem

log = logging.getLogger("mlx_loom.schemas")
REGEX_ERROR = "regex parse error"
"""How llguidance's refusal of a pattern it cannot parse (look-around, backreferences) begins."""


Served = tuple[str, tuple[str, ...], tuple[str, ...]]
"""(grammar, relaxed, narrowed)."""


class Compiler(Protocol):
    def grammar_for(self, schema: object, param: str, warnings_ok: bool = False, **options: bool) -> str: ...

    def check_runs(self, grammar: str, schema: object, param: str) -> None: ...

    pattern_error: PatternCheck


def best_effort(compiler: Compiler, schema: object, param: str) -> Served:
    """(grammar, relaxed, narrowed) for a valid JSON Schema; GrammarError only for an invalid one."""
    invalid = schema_error(schema)
    if invalid is not None:
        raise GrammarError(f"invalid JSON schema: {invalid}", param)
    why = recursion_problem(schema)
    if why is None:
        # Patterns are checked one by one only once llguidance refused one (the common case pays nothing).
        for pattern_error in (None, compiler.pattern_error):
            found = _first_rung(compiler, prepare(schema, relax=True, pattern_error=pattern_error), param)
            if isinstance(found, tuple):
                return found
            why = found
            if REGEX_ERROR not in why:
                break
        served = _unfolded(compiler, prepare(schema, relax=True, pattern_error=compiler.pattern_error), param, why)
        if served is not None:
            return served
    fallback = _root_type_schema(schema)
    log.info("best-effort schema falls back to %s: %s", fallback, why)
    grammar = compiler.grammar_for(fallback, param)
    kind = fallback.get("type", "value")
    return grammar, (f"/: the schema is not enforced ({short_error(why, 160)}); any JSON {kind} is generated",), ()


def _first_rung(compiler: Compiler, prepared: Prepared, param: str) -> Served | str:
    """(grammar, relaxed, narrowed) from the first rung that compiles and runs, else the last refusal."""
    relaxed = tuple(map(str, prepared.problems))
    coerced = tuple(map(str, prepared.unproven_one_of))
    lenient = ("/: keywords the grammar engine still cannot compile are ignored",)
    rungs: list[tuple[dict, tuple[str, ...]]] = [({}, ())]
    if coerced:
        rungs.append(({"coerce_one_of": True}, coerced))
    rungs.append(({"coerce_one_of": True, "lenient": True}, coerced + lenient))
    why = ""
    for options, notes in rungs:
        try:
            grammar = compiler.grammar_for(prepared.schema, param, warnings_ok=bool(options), **options)
        except GrammarError as exc:
            why = why if REGEX_ERROR in why else str(exc)  # a bad pattern is what the next pass can fix
            continue
        try:
            compiler.check_runs(grammar, prepared.schema, param)
        except GrammarError as exc:  # a limit or no instance: other compile options do not change that
            return str(exc)
        return grammar, relaxed + notes, tuple(map(str, prepared.narrowed))
    return why


UNFOLD_DEPTHS = (3, 2, 1)
MAX_UNFOLDED_CHARS = 100_000
"""Largest unfolded schema tried (JSON text): compile time grows with it (~0.2 s at 100k)."""


def _unfolded(compiler: Compiler, prepared: Prepared, param: str, why: str) -> Served | None:
    """The schema with its $refs inlined a few levels deep (then anything): for what llguidance refuses
    through circular $refs. The deepest unfolding that stays under MAX_UNFOLDED_CHARS and compiles;
    None when none does."""
    if "$ref" not in json.dumps(prepared.schema):
        return None
    flats = []
    for depth in sorted(UNFOLD_DEPTHS):  # shallow first: stop before one grows too large to build
        flat = unfold(prepared.schema, depth)
        if len(json.dumps(flat)) > MAX_UNFOLDED_CHARS:
            break
        flats.append((depth, flat))
    for depth, flat in reversed(flats):
        try:
            grammar = compiler.grammar_for(flat, param, warnings_ok=True, coerce_one_of=True, lenient=True)
            compiler.check_runs(grammar, flat, param)
        except GrammarError:
            continue
        note = (f"/: $refs more than {depth} levels deep are not enforced (the grammar engine refused the "
                f"schema: {short_error(why, 120)})")
        relaxed = tuple(map(str, prepared.problems + prepared.unproven_one_of))
        return grammar, relaxed + (note,), tuple(map(str, prepared.narrowed))
    return None


def _root_type_schema(schema: object) -> dict:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(kind, list) and len(kind) == 1:
        kind = kind[0]
    return {"type": kind} if kind in ("object", "array", "string", "number", "integer", "boolean", "null") else {}


def schema_error(schema: object) -> str | None:
    """Why `schema` is not valid JSON Schema under its own $schema (2020-12 by default), or None."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/" + "/".join(str(p) for p in exc.path) if exc.path else "/"
        return f"{short_error(exc.message, 160)} (at {where})"
    for pointer, node in reachable(schema):  # a local $ref to nothing cannot be evaluated by anyone
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#") and resolve(schema, ref) is None:
            return f"$ref {short_error(ref, 120)} points at nothing (at {pointer or '/'}/$ref)"
    return None
