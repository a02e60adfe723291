"""Schema rewrites (mlx_loom/schemas/rewrite.py) are sound, strict refusals list everything, best effort serves.

Soundness is shown the way the grammar is used: random documents are generated token by token
under the compiled (rewritten) grammar of the default model's tokenizer, and every one must
validate against the ORIGINAL schema with jsonschema. Schemas are written in the style of each
JSONSchemaBench subset (GitHub, Glaive function calls, Kubernetes, Snowplow, JSON Schema Store,
Washington Post). No weights, no engine.
"""

import base64
import json
import re

import jsonschema
import llguidance
import numpy as np
import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
from mlx_loom.schemas.features import FORMAT_PATTERNS, NATIVE_FORMATS, UNSUPPORTED_KEYWORDS
from mlx_loom.schemas.grammar import GrammarError, GrammarSpec
from mlx_loom.schemas.llguidance_backend import JSON_OPTIONS, parser_limits
from mlx_loom.schemas.negate import negate, not_literal_pattern
from mlx_loom.schemas.rewrite import prepare

DOCS = 24
MAX_TOKENS = 160

SOUND = {
    # GitHub style: draft-07 dependencies (array form) and draft 2019 dependentRequired.
    "github_dependencies": {
        "$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 3}, "card": {"type": "string", "maxLength": 2},
                       "address": {"type": "string", "maxLength": 2}, "zip": {"type": "integer"}},
        "required": ["name"], "additionalProperties": False,
        "dependencies": {"card": ["address"], "address": ["zip"]}},
    "github_dependent_required": {
        "type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}, "c": {"type": "null"}},
        "additionalProperties": False, "dependentRequired": {"a": ["b", "c"]}},
    # Washington Post style: draft-04 dependencies in schema form, $ref with ignored siblings.
    "washingtonpost_schema_dependency": {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "definitions": {"kind": {"type": "string", "enum": ["story", "section", "video"]}},
        "type": "object", "additionalProperties": False, "required": ["id"],
        "properties": {"id": {"type": "string", "maxLength": 3}, "website": {"type": "string", "maxLength": 3},
                       "type": {"$ref": "#/definitions/kind", "description": "ignored sibling", "type": "string"}},
        "dependencies": {"website": {"properties": {"type": {"enum": ["section"]}}, "required": ["type"]}}},
    # Snowplow style: if/then/else on an enum discriminator; JSON Schema Store style: on a free string.
    "snowplow_if_then_else": {
        "type": "object", "additionalProperties": False, "required": ["kind"],
        "properties": {"kind": {"enum": ["page", "click", "scroll"]}, "x": {"type": "integer", "minimum": 0},
                       "url": {"type": "string", "maxLength": 4}},
        "if": {"properties": {"kind": {"const": "click"}}}, "then": {"required": ["x"]},
        "else": {"required": ["url"], "properties": {"x": False}}},
    "schemastore_if_free_string": {
        "type": "object", "additionalProperties": False,
        "properties": {"country": {"type": "string", "maxLength": 2}, "zip": {"type": "string", "pattern": "^[0-9]{2}$"},
                       "n": {"type": "integer"}},
        "if": {"properties": {"country": {"const": "US"}}, "required": ["country"]},
        "then": {"required": ["zip"]}, "else": {"properties": {"zip": {"pattern": "^[a-c]{2}$"}}}},
    "schemastore_if_type_and_bounds": {
        "type": "object", "properties": {"v": {"type": ["integer", "string"], "maxLength": 2}},
        "required": ["v"], "additionalProperties": False,
        "if": {"properties": {"v": {"type": "string", "minLength": 1}}}, "then": {"properties": {"v": {"maxLength": 1}}},
        "else": {"properties": {"v": {"minimum": 10, "maximum": 12}}}},
    # Kubernetes style: int-or-string oneOf (disjoint types).
    "kubernetes_int_or_string": {
        "type": "object", "additionalProperties": False, "required": ["port"],
        "properties": {"port": {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "integer"}]}}},
    # Glaive style: function-call arguments with a const discriminator in oneOf branches (via $ref).
    "glaive_discriminated_one_of": {
        "$defs": {"circle": {"type": "object", "properties": {"shape": {"const": "circle"}, "r": {"type": "number"}},
                             "required": ["shape", "r"], "additionalProperties": False},
                  "square": {"type": "object", "properties": {"shape": {"const": "square"}, "side": {"type": "integer"}},
                             "required": ["shape"], "additionalProperties": False}},
        "type": "object", "required": ["shape"], "additionalProperties": False,
        "properties": {"shape": {"oneOf": [{"$ref": "#/$defs/circle"}, {"$ref": "#/$defs/square"}]}}},
    "github_one_of_required_vs_forbidden": {
        "oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                   "additionalProperties": False},
                  {"type": "object", "properties": {"b": {"type": "boolean"}}, "additionalProperties": False}]},
    "github_one_of_enum_fails_pattern": {
        "type": "object", "required": ["id"], "additionalProperties": False,
        "properties": {"id": {"oneOf": [{"type": "string", "pattern": "^[a-f0-9]{3}$"}, {"type": "string", "enum": [""]},
                                        {"type": "null"}]}}},
    "schemastore_one_of_required_sets": {  # overlapping branches: rewritten with complements
        "type": "object", "properties": {"c": {"type": "integer"}, "m": {"type": "boolean"}}, "additionalProperties": False,
        "oneOf": [{"required": ["c"]}, {"required": ["m"]}]},
    # JSON Schema Store style: uniqueItems over a small enum, and over free strings (at most one item).
    "schemastore_unique_enum": {
        "type": "object", "additionalProperties": False, "required": ["skip"],
        "properties": {"skip": {"type": "array", "uniqueItems": True, "minItems": 1,
                                "items": {"type": "string", "enum": ["meta", "summary", "success", "failure"]}}}},
    "schemastore_unique_strings": {
        "type": "array", "uniqueItems": True, "items": {"type": "string", "maxLength": 3}},
    "schemastore_unique_booleans": {"type": "array", "uniqueItems": True, "items": {"type": "boolean"}},
    # Simple `not` forms.
    "github_not_forms": {
        "type": "object", "additionalProperties": False,
        "properties": {"a": {"type": "string", "maxLength": 2, "not": {"const": "x"}},
                       "b": {"not": {"type": ["string", "object", "array", "number"]}},
                       "c": {"type": "integer", "not": {"enum": [1, 2, 3]}, "minimum": 0, "maximum": 5},
                       "d": {"type": "integer"}},
        "not": {"required": ["d"]}},
    # Formats: by pattern (uri-reference, regex, color, byte), custom ones as annotations.
    "github_formats": {
        "type": "object", "additionalProperties": False, "required": ["u", "r", "c", "b", "e"],
        "properties": {"u": {"type": "string", "format": "uri-reference", "maxLength": 8},
                       "r": {"type": "string", "format": "regex", "maxLength": 6},
                       "c": {"type": "string", "format": "color"},
                       "b": {"type": "string", "format": "byte", "maxLength": 8},
                       "e": {"type": "string", "format": "evenlength", "maxLength": 2}}},
}


@pytest.fixture(scope="module")
def short_tokens(tok):
    """Ids of one-character tokens: preferring them lets random documents finish."""
    return np.array([i for i in range(tok.vocab_size) if len(tok.decode([i])) == 1])


def random_documents(backend, tok, short_tokens, spec: GrammarSpec, n: int, seed: int = 0) -> list[str]:
    """Up to n documents sampled at random under the compiled grammar (unfinished ones are dropped)."""
    rng = np.random.default_rng(seed)
    grammar = backend.compile(spec)
    eos = sorted(tok.eos_token_ids)
    docs = []
    for _ in range(n):
        m = backend.new_matcher(grammar)
        ids: list[int] = []
        while len(ids) < MAX_TOKENS and not m.is_stopped():
            out = np.zeros((1, backend.mask_words), dtype=np.int32)
            backend.fill_masks([m], out)
            allowed = np.unpackbits(out.view(np.uint8), bitorder="little")[: backend.vocab_size].astype(bool)
            if m.is_accepting() and (allowed[eos].any() or not allowed.any()) and rng.random() < 0.5:
                break
            allowed[eos] = False
            short = short_tokens[allowed[short_tokens]]
            pool = short if len(short) and rng.random() < 0.85 else np.flatnonzero(allowed)
            if not len(pool):
                break
            t = int(rng.choice(pool))
            assert m.consume(t), (spec.name, tok.decode(ids), t)
            ids.append(t)
        if m.is_accepting():
            docs.append(tok.decode(ids))
    return docs


@pytest.mark.parametrize("name", sorted(SOUND))
def test_random_documents_of_the_rewritten_grammar_validate_against_the_original(backend, tok, short_tokens, name):
    schema = SOUND[name]
    prepared = prepare(schema)
    assert not prepared.problems, prepared.problems
    docs = random_documents(backend, tok, short_tokens, GrammarSpec.json_schema(schema, name=name), DOCS)
    assert len(docs) >= DOCS // 3, f"{name}: only {len(docs)} finished"
    cls = jsonschema.validators.validator_for(schema)
    for text in docs:
        doc = json.loads(text)
        cls(schema, format_checker=cls.FORMAT_CHECKER).validate(doc)
        if name == "github_formats":
            check_formats(doc)
    assert len({d for d in docs}) > 1 or name == "schemastore_unique_booleans", docs


def check_formats(doc: dict) -> None:
    """Reference checkers for the formats the grammar enforces by pattern."""
    from rfc3986_validator import validate_rfc3986

    assert validate_rfc3986(doc["u"], rule="URI_reference"), doc
    re.compile(doc["r"])
    assert re.fullmatch(r"#[0-9A-Fa-f]{3}([0-9A-Fa-f]{3})?", doc["c"]), doc
    base64.b64decode(doc["b"], validate=True)


@pytest.mark.parametrize("text", ["", "a", "US", "a.b", "x]y", "\\", "é"])
def test_not_literal_pattern_matches_everything_but_the_text(text):
    regex = re.compile(not_literal_pattern(text))
    for other in ["", "a", "US", "USA", "U", "a.b", "aXb", "x]y", "\\", "\\\\", "é", "e", "\n"]:
        assert bool(regex.fullmatch(other)) == (other != text), (text, other)


@pytest.mark.parametrize("schema,instances", [
    ({"type": "string"}, ["x", 1, None, [], {}]),
    ({"const": 3}, [3, 3.0, 2.5, 4, "3", None]),
    ({"enum": [1, 2]}, [1, 2, 1.5, 3, 0, "1"]),
    ({"enum": [True]}, [True, False, 1]),
    ({"required": ["a"]}, [{"a": 1}, {}, 5]),
    ({"properties": {"a": {"const": "x"}}}, [{"a": "x"}, {"a": "y"}, {}, "s"]),
    ({"minimum": 2}, [1, 2, 3, "z"]),
    ({"maxLength": 1}, ["", "a", "ab", 7]),
    ({"anyOf": [{"type": "null"}, {"required": ["k"]}]}, [None, {"k": 1}, {}, 2]),
])
def test_negate_is_the_exact_complement(schema, instances):
    neg = negate(schema)
    assert neg is not None
    for x in instances:
        assert jsonschema.Draft202012Validator(neg).is_valid(x) != jsonschema.Draft202012Validator(schema).is_valid(x), x


def test_negate_refuses_what_it_cannot_express():
    for schema in ({"type": "integer"}, {"pattern": "^a"}, {"enum": ["a", "b"]}, {"$ref": "#/x"}):
        assert negate(schema) is None, schema


@pytest.mark.parametrize("name,bad", [
    ("github_dependencies", {"name": "a", "card": "x"}),
    ("snowplow_if_then_else", {"kind": "click", "url": "u"}),
    ("snowplow_if_then_else", {"kind": "page"}),
    ("schemastore_if_free_string", {"country": "US"}),
    ("schemastore_one_of_required_sets", {"c": 1, "m": True}),
    ("schemastore_unique_enum", {"skip": ["meta", "meta"]}),
    ("github_not_forms", {"d": 1}),
    ("github_one_of_enum_fails_pattern", {"id": 5}),
])
def test_rewritten_grammar_rejects_invalid_documents(backend, tok, name, bad):
    """Exactness where it matters: a document the schema forbids cannot be generated."""
    schema = SOUND[name]
    assert not jsonschema.validators.validator_for(schema)(schema).is_valid(bad)
    m = backend.new_matcher(backend.compile(GrammarSpec.json_schema(schema)))
    text = json.dumps(bad, separators=(", ", ": "))
    assert not (all(m.consume(t) for t in tok.encode(text)) and m.is_accepting()), text


UNSUPPORTED = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "minItems": 2},
        "name": {"type": "string", "not": {"pattern": "^x"}},
        "meta": {"type": "object", "propertyNames": {"maxLength": 3}},
        "pick": {"oneOf": [{"type": "string", "pattern": "^a"}, {"type": "string", "pattern": "b$"}]},
        "when": {"type": "string", "format": "uri-template"},
    },
    "if": {"properties": {"name": {"pattern": "^a"}}}, "then": {"required": ["tags"]},
}
UNSUPPORTED_POINTERS = ["/properties/tags/uniqueItems", "/properties/name/not", "/properties/meta/propertyNames",
                        "/properties/pick/oneOf", "/properties/when/format", "/if"]


def test_strict_refusal_lists_every_unsupported_feature_with_its_pointer(backend):
    with pytest.raises(GrammarError) as exc:
        backend.compile(GrammarSpec.json_schema(UNSUPPORTED, strict=True))
    message = str(exc.value)
    for pointer in UNSUPPORTED_POINTERS:
        assert pointer in message, (pointer, message)
    assert "coerce_one_of" not in message and "strict to false" in message
    assert exc.value.param == "response_format.json_schema.schema"


def test_unused_definitions_are_not_reported(backend):
    schema = {"$defs": {"unused": {"not": {"pattern": "x"}}}, "type": "object", "properties": {"a": {"type": "integer"}}}
    assert backend.compile(GrammarSpec.json_schema(schema, strict=True)).grammar


def test_best_effort_serves_and_lists_what_it_relaxed(backend):
    grammar = backend.compile(GrammarSpec.json_schema(UNSUPPORTED, strict=False))
    relaxed = "\n".join(grammar.relaxed)
    for pointer in UNSUPPORTED_POINTERS:
        assert pointer in relaxed, (pointer, relaxed)


@pytest.mark.parametrize("schema", [
    {"$ref": "#"},  # no instance at all
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # no finite instance
    {"type": "string", "pattern": "^a{1000000}$"},  # over the lexer's limits
    {"type": "string", "pattern": "^(?!x).*$"},  # look-around
    {"type": "object", "patternProperties": {"^a": {"type": "string"}, "^ab": {"type": "integer"}}},
    {"$ref": "https://example.com/elsewhere.json"},
])
def test_best_effort_never_refuses_a_valid_schema(backend, schema):
    jsonschema.validators.validator_for(schema).check_schema(schema)
    grammar = backend.compile(GrammarSpec.json_schema(schema, strict=False))
    assert grammar.grammar and grammar.relaxed
    with pytest.raises(GrammarError):
        backend.compile(GrammarSpec.json_schema(schema, strict=True))


def test_best_effort_refuses_invalid_json_schema(backend):
    with pytest.raises(GrammarError, match="invalid JSON schema"):
        backend.compile(GrammarSpec.json_schema({"type": "strin"}, strict=False))


def test_best_effort_and_strict_agree_on_supported_schemas(backend):
    for name, schema in SOUND.items():
        assert not backend.compile(GrammarSpec.json_schema(schema, strict=False)).relaxed, name


def test_features_table_matches_the_installed_engine(backend):
    def refused(schema: dict) -> bool:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, backend.tokenizer, limits=parser_limits())
        return bool(is_error or messages)
    for key in UNSUPPORTED_KEYWORDS - {"then", "else"}:
        assert refused({"type": "object", key: {}}), key
    for fmt in NATIVE_FORMATS:
        assert not refused({"type": "string", "format": fmt}), fmt
    for fmt, pattern in FORMAT_PATTERNS.items():
        assert not refused({"type": "string", "pattern": pattern}), fmt


def test_keywords_beside_a_ref_are_ignored_in_drafts_before_2019():
    inner = {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "minItems": 2}
    legacy = {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"s": {"type": "string"}},
              "type": "object", "properties": {"a": {"$ref": "#/definitions/s", "properties": {"x": inner}}}}
    prepared = prepare(legacy)
    assert not prepared.problems and prepared.schema["properties"]["a"] == {"$ref": "#/definitions/s"}
    current = {**legacy, "$schema": "https://json-schema.org/draft/2020-12/schema"}
    assert [p.pointer for p in prepare(current).problems] == ["/properties/a/properties/x/uniqueItems"]


CIRCULAR = {  # Washington Post style: a property and a matching patternProperty, both through a circular $ref
    "$defs": {"n": {"type": "object", "properties": {"k": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
    "type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "patternProperties": {"^a": {"$ref": "#/$defs/n"}},
    "required": ["a"], "additionalProperties": False}


def test_best_effort_unfolds_circular_refs_llguidance_cannot_intersect(backend, tok, short_tokens):
    with pytest.raises(GrammarError):
        backend.compile(GrammarSpec.json_schema(CIRCULAR, strict=True))
    spec = GrammarSpec.json_schema(CIRCULAR, strict=False)
    assert "levels deep" in backend.compile(spec).relaxed[-1]
    docs = random_documents(backend, tok, short_tokens, spec, 8)
    assert docs and all("a" in json.loads(d) for d in docs), docs  # the structure is kept, not any object
