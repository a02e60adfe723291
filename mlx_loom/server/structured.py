"""response_format -> a compiled grammar before anything is submitted; final validation after.

json_schema.strict true: the output matches the schema exactly, or a 400 before generation lists
every part of the schema that cannot be enforced, with its JSON pointer. strict false or absent
(OpenAI's default): best effort (mlx_loom/schemas/best_effort.py): what cannot be enforced is
relaxed, and only a schema that is not valid JSON Schema is a 400. Either way each finished
("stop") output is validated against the client's schema with `jsonschema`; one that does not
validate carries `validation_error` (a string) on its choice, an extra field OpenAI clients ignore.

Compilation runs in a worker thread (llguidance releases the GIL) and is cached by schema
hash inside the backend, so a bad schema is a 400 before any token is generated and a repeated
schema costs nothing. The backend refuses, with a short message, schemas the engine could not
generate from (a $ref loop, required recursion, a regex over the lexer's limits: its dry run
computes the first masks), so none of them reaches the engine. Validation with `jsonschema`
re-checks each finished constrained output: under strict the grammar should make it redundant, so
a failure is reported (logged and attached to the choice), never hidden. Formats are annotations
here (jsonschema's default): the grammar enforces those it can.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging

from mlx_loom.schemas.grammar import CompiledGrammar, GrammarError, GrammarSpec, short_error
from mlx_loom.server.errors import bad_request
from mlx_loom.server.protocol import ResponseFormat

log = logging.getLogger("mlx_loom.server")
MAX_MESSAGE_CHARS = 12_000
"""Longest schema error message sent to a client: a strict refusal lists every unenforceable part
(backends cut their own engine's detail to ~200 characters inside)."""


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
        return GrammarSpec.json_schema(js.schema_, name=js.name, strict=js.strict is True)
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


MAX_HEADER_CHARS = 2000
"""Longest X-Schema-Relaxed / X-Schema-Narrowed value (then "..."): headers travel with every response."""


def schema_headers(grammar: CompiledGrammar | None) -> dict[str, str]:
    """Known before generation, so sent as headers (streaming too): the JSON pointers of what the
    grammar relaxes (best effort) or narrows. Absent when the schema is enforced as is."""
    out = {}
    for name, notes in (("X-Schema-Relaxed", grammar.relaxed if grammar else ()),
                        ("X-Schema-Narrowed", grammar.narrowed if grammar else ())):
        if notes:
            text = ", ".join(n.split(": ", 1)[0] for n in notes).encode("ascii", "backslashreplace").decode()
            out[name] = text if len(text) <= MAX_HEADER_CHARS else text[: MAX_HEADER_CHARS - 3] + "..."
    return out


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
    from referencing.exceptions import Unresolvable

    try:
        error = jsonschema.exceptions.best_match(validator_for_spec(spec).iter_errors(doc))
    except (jsonschema.SchemaError, Unresolvable) as exc:
        return f"schema could not be checked: {short_error(str(getattr(exc, 'message', exc)))}"
    if error is None:
        return None
    where = "/" + "/".join(str(p) for p in error.absolute_path)
    return f"output does not match the schema at {where}: {short_error(error.message)}"


@functools.lru_cache(maxsize=256)
def _validator(kind: str, schema_text: str | None):
    from jsonschema.validators import validator_for
    from referencing import Registry

    schema = json.loads(schema_text) if schema_text is not None else {"type": "object"}
    # An empty registry that fetches nothing: a $ref to another document is unresolvable, never a download.
    return validator_for(schema)(schema, registry=Registry(retrieve=_no_remote))


def _no_remote(uri: str):
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(ref=uri)


def validator_for_spec(spec: GrammarSpec):
    """The jsonschema validator of a spec's schema (cached: built once per schema)."""
    return _validator(spec.kind, spec.schema)
