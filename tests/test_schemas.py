"""Grammar layer (mlx_loom/schemas/) on the default model's tokenizer: no weights, no engine."""

import json

import numpy as np
import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
from mlx_loom.schemas.grammar import GrammarError, GrammarSpec
from structured_schemas import PERSON, SCHEMAS

WHITESPACE = (" ", "\n", "\t", "  ", "\n\n", " \n")


def allowed(backend, matcher) -> np.ndarray:
    out = np.zeros((1, backend.mask_words), dtype=np.int32)
    backend.fill_masks([matcher], out)
    return np.unpackbits(out.view(np.uint8), axis=1, bitorder="little")[0, : backend.vocab_size].astype(bool)


def test_every_corpus_schema_compiles(backend):
    assert len(SCHEMAS) >= 30
    for name, _, schema in SCHEMAS:
        assert backend.compile(GrammarSpec.json_schema(schema, name=name)).grammar


def test_valid_document_is_accepted_token_by_token(backend, tok):
    m = backend.new_matcher(backend.compile(GrammarSpec.json_schema(PERSON)))
    eos = sorted(tok.eos_token_ids)
    for t in tok.encode('{"name": "Ann", "age": 31}'):
        mask = allowed(backend, m)
        assert mask[t], tok.decode([t])
        assert not mask[eos].any()  # EOS only once the document is complete
        assert m.consume(t)
    assert m.is_accepting() and m.is_stopped() and m.error() is None


def test_token_outside_the_schema_is_masked(backend, tok):
    m = backend.new_matcher(backend.compile(GrammarSpec.json_schema(PERSON)))
    for t in tok.encode('{"name": "Ann", "age": '):
        m.consume(t)
    mask = allowed(backend, m)
    assert not mask[tok.encode('"')[0]]  # age is an integer
    assert mask[tok.encode("3")[0]]


def test_special_tokens_never_allowed_inside_strings_or_at_start(backend, tok):
    control = sorted(tok.control_ids - tok.eos_token_ids)
    assert control, "the default tokenizer has control tokens such as <|im_start|>"
    m = backend.new_matcher(backend.compile(GrammarSpec.json_schema(PERSON)))
    assert not allowed(backend, m)[control].any()
    for t in tok.encode('{"name": "An'):
        m.consume(t)
    mask = allowed(backend, m)
    assert not mask[control].any() and not mask[sorted(tok.eos_token_ids)].any()


def test_whitespace_outside_strings_is_bounded(backend, tok):
    """Greedily take a whitespace token whenever allowed: the run must stay short."""
    ws = [i for i in range(tok.vocab_size) if tok.decode([i]) in WHITESPACE]
    for spec in (GrammarSpec.json_object(), GrammarSpec.json_schema(SCHEMAS[16][2])):
        m = backend.new_matcher(backend.compile(spec))
        for prefix in ('', '{', '{"name"', '{"name": "x"', '{"name": "x",'):
            m = backend.new_matcher(backend.compile(spec))
            ok = all(m.consume(t) for t in tok.encode(prefix))
            if not ok:
                continue
            run = 0
            while run < 5:
                mask = allowed(backend, m)
                choice = next((t for t in ws if mask[t]), None)
                if choice is None:
                    break
                m.consume(choice)
                run += 1
            assert run <= 1, (spec.kind, prefix, run)


def test_json_object_takes_objects_only(backend, tok):
    spec = GrammarSpec.json_object()
    m = backend.new_matcher(backend.compile(spec))
    assert all(m.consume(t) for t in tok.encode(json.dumps({"a": [1, {"b": None}]})))
    assert m.is_accepting()
    m = backend.new_matcher(backend.compile(spec))
    assert not allowed(backend, m)[tok.encode("[")[0]]


@pytest.mark.parametrize("schema,needle", [
    ({"type": "strin"}, "strin"),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"type": "string", "pattern": "[a-"}, "regex"),
])
def test_invalid_schemas_raise_with_the_problem_named(backend, schema, needle):
    with pytest.raises(GrammarError, match=needle):
        backend.compile(GrammarSpec.json_schema(schema))


def test_non_object_schema_is_refused():
    with pytest.raises(GrammarError, match="object"):
        GrammarSpec.json_schema(["not", "a", "schema"])


def test_compile_cache_returns_the_same_grammar(backend):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}, "a": {"type": "string"}}}
    a = backend.compile(GrammarSpec.json_schema(schema))
    assert backend.compile(GrammarSpec.json_schema(dict(schema))) is a
    # Property order is kept: it is the order the model must write them in.
    swapped = {"type": "object", "properties": {"a": {"type": "string"}, "x": {"type": "integer"}}}
    assert backend.compile(GrammarSpec.json_schema(swapped)) is not a
