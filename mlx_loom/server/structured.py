"""response_format -> a compiled grammar before anything is submitted; final validation after.

Compilation runs in a worker thread (llguidance releases the GIL) and is cached by schema
hash inside the backend, so a bad schema is a 400 before any token is generated and a repeated
schema costs nothing. The backend refuses, with a short message, schemas the engine could not
generate from (a $ref loop, required recursion, a regex over the lexer's limits: its dry run
computes the first masks), so none of them reaches the engine. Validation with `jsonschema`
re-checks each finished constrained output: the grammar should make it redundant, so a failure
is reported (logged and attached to the choice), never hidden.
"""

from __future__ import annotations

import asyncio
import json
import logging

from mlx_loom.schemas.grammar import CompiledGrammar, GrammarError, GrammarSpec, short_error
from mlx_loom.server.errors import bad_request
from mlx_loom.server.protocol import ResponseFormat

log = logging.getLogger("mlx_loom.server")
MAX_MESSAGE_CHARS = 280
"""Longest schema error message sent to a client (the engine's own detail is cut to ~200 inside)."""


def grammar_spec(fmt: ResponseFormat | None) -> GrammarSpec | None:
    """The grammar a response_format asks for; None for free text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec.json_object()
    js = fmt.json_schema
    if js is None or js.schema_ is None:
        raise bad_request('response_format type "json_schema" needs json_schema.schema (a JSON Schema object)',
                          "response_format.json_schema")
    try:
        return GrammarSpec.json_schema(js.schema_, name=js.name)  # js.strict is not read: always strict
    except GrammarError as exc:
        raise bad_request(str(exc), "response_format.json_schema.schema", "invalid_schema") from None


async def compile_grammar(info, spec: GrammarSpec | None, param: str | None = None) -> CompiledGrammar | None:
    """param: the request field to name in a 400 (default: the one the backend names)."""
    if spec is None:
        return None
    backend = getattr(info, "grammar", None)
    if backend is None:
        raise bad_request("structured output is not available for this model's tokenizer",
                          param or "response_format")
    try:
        return await asyncio.to_thread(backend.compile, spec)
    except GrammarError as exc:
        raise bad_request(_short(str(exc)), param or exc.param or "response_format", "invalid_schema") from None
    except ValueError as exc:  # the backend refused the grammar some other way: still the client's schema
        log.warning("grammar compile refused (%s): %s", spec.key[:12], exc)
        raise bad_request(f"the JSON schema cannot be enforced ({short_error(str(exc))})",
                          param or "response_format", "invalid_schema") from None


def _short(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A schema error message capped for the client (backends already keep theirs short)."""
    return message if len(message) <= limit else message[: limit - 3].rstrip() + "..."


def validation_error(grammar: CompiledGrammar | None, text: str, finish_reason: str | None) -> str | None:
    """Why a finished constrained output does not validate (None when it does or is unconstrained).

    Only "stop" outputs are checked: a "length" output was cut before the document ended.
    """
    if grammar is None or finish_reason != "stop":
        return None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        problem = f"output is not valid JSON: {exc}"
    else:
        problem = _schema_problem(grammar.spec, doc)
    if problem is not None:
        log.error("structured output failed validation (%s): %s", grammar.spec.key[:12], problem)
    return problem


def _schema_problem(spec: GrammarSpec, doc: object) -> str | None:
    import jsonschema

    schema = spec.schema_obj() if spec.schema is not None else {"type": "object"}
    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError as exc:
        return f"output does not match the schema: {exc.message}"
    except jsonschema.SchemaError as exc:
        return f"schema could not be checked: {exc.message}"
    return None
