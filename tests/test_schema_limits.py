"""Schemas that break the grammar engine: refused with a short 400 before generation, or (if a
limit is only hit mid-way) that request ends with a short error while the engine serves on.

The HTTP tests run one real server (`python -m mlx_loom.server.cli serve`, default model) for the
module, in a subprocess: an in-process engine thread would trip over MLX arrays other test
modules created on the main thread. The mid-generation tests drive an EngineCore directly.
"""

import json
import time

import httpx
import jsonschema
import pytest

from engine_driver import chat_ids, make_core
from mlx_loom.engine.client import RequestRejected
from mlx_loom.engine.messages import AddRequest
from mlx_loom.sched.params import SamplingParams
from mlx_loom.sample.structured import StructuredOutput
from mlx_loom.schemas.grammar import CompiledGrammar, GrammarError, GrammarSpec, short_error
from mlx_loom.schemas.schema_checks import recursion_problem, string_constraints
from mlx_loom.server.routes.common import as_api_error
from server_fixtures import real_server
from structured_schemas import PERSON, SCHEMAS

MAX_MESSAGE = 300
NORMAL = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
HOSTILE = {
    "required_self_recursion": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    "huge_regex": {"type": "string", "pattern": "^a{1000000}$"},
    "huge_regex_in_property": {"type": "object", "properties": {"s": {"type": "string", "pattern": "^a{1000000}$"}},
                               "required": ["s"]},
    "huge_regex_after_other_fields": {
        "type": "object", "properties": {"ok": {"type": "boolean"}, "name": {"type": "string"},
                                         "s": {"type": "string", "pattern": "^(a{1000}){1000}$"}},
        "required": ["ok", "name", "s"]},
    "ref_to_root": {"$ref": "#"},
    "ref_loop": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "required_recursion_via_defs": {
        "$defs": {"node": {"type": "object", "required": ["child"],
                           "properties": {"child": {"$ref": "#/$defs/node"}}}},
        "type": "object", "properties": {"root": {"$ref": "#/$defs/node"}}, "required": ["root"]},
    "required_recursion_in_array": {"type": "array", "minItems": 1, "items": {"$ref": "#"}},
}


def chat(schema, stream: bool = False, strict: bool = True, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 24, "temperature": 0,
            "stream": stream, **extra,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema,
                                                                       "strict": strict}}}


@pytest.fixture(scope="module")
def http():
    with real_server("--max-num-seqs", "8", "--kv-cache-memory-gb", "0.25", "--max-model-len", "2048",
                     "--log-level", "warning") as base:
        with httpx.Client(base_url=base, timeout=120) as client:
            yield client


@pytest.fixture(scope="module")
def core(default_model):
    return make_core(default_model, num_blocks=256, max_num_seqs=8, budget=256)


def assert_short_400(resp, code: str, param: str | None = "response_format.json_schema.schema") -> str:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert 0 < len(err["message"]) < MAX_MESSAGE, err["message"]
    assert "<state>" not in err["message"] and "Parser:" not in err["message"], err["message"]
    return err["message"]


def assert_normal_schema_works(http) -> None:
    r = http.post("/v1/chat/completions", json=chat(NORMAL))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), NORMAL)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_schema_is_a_short_400_before_generation(http, name):
    t0 = time.perf_counter()
    r = http.post("/v1/chat/completions", json=chat(HOSTILE[name]))
    elapsed = time.perf_counter() - t0
    message = assert_short_400(r, "invalid_schema")
    assert elapsed < 2.0, f"{name}: refused after {elapsed:.2f}s"
    # The refusal is cached: the same schema again costs nothing and says the same.
    t0 = time.perf_counter()
    again = http.post("/v1/chat/completions", json=chat(HOSTILE[name], stream=True))
    assert assert_short_400(again, "invalid_schema") == message  # streaming: 400 before the stream starts
    assert time.perf_counter() - t0 < 0.5
    assert_normal_schema_works(http)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_schema_is_served_best_effort_when_not_strict(http, name):
    """strict false never refuses a valid JSON Schema: it falls back to what can be enforced, and a
    finished output that does not match is reported on the choice."""
    r = http.post("/v1/chat/completions", json=chat(HOSTILE[name], strict=False))
    assert r.status_code == 200, r.text
    assert r.headers["x-schema-relaxed"] == "/", r.headers  # the whole schema fell back to its root type
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        valid = jsonschema.Draft202012Validator(HOSTILE[name]).is_valid(json.loads(choice["message"]["content"]))
        assert ("validation_error" in choice) == (not valid), choice


def test_strict_refusal_lists_every_pointer_and_best_effort_serves(http):
    schema = {"type": "object", "properties": {
        "a": {"type": "string", "not": {"pattern": "x"}},
        "b": {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "minItems": 2}}}
    pointers = ("/properties/a/not", "/properties/b/uniqueItems")
    r = http.post("/v1/chat/completions", json=chat(schema))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_schema" and err["param"] == "response_format.json_schema.schema", err
    assert all(p in err["message"] for p in pointers) and "coerce_one_of" not in err["message"], err
    assert "strict to false" in err["message"], err
    r = http.post("/v1/chat/completions", json=chat(schema, strict=False))
    assert r.status_code == 200, r.text
    assert r.headers["x-schema-relaxed"] == ", ".join(pointers), r.headers
    assert "x-schema-narrowed" not in r.headers


@pytest.mark.parametrize("name,needle", [
    ("required_self_recursion", "no finite instance"),
    ("required_recursion_via_defs", "no finite instance"),
    ("required_recursion_in_array", "no finite instance"),
    ("ref_to_root", "$ref"),
    ("ref_loop", "$ref"),
    ("huge_regex", "too large"),
    ("huge_regex_after_other_fields", "too large"),
])
def test_refusal_says_what_to_fix(http, name, needle):
    message = assert_short_400(http.post("/v1/chat/completions", json=chat(HOSTILE[name])), "invalid_schema")
    assert needle in message, message


def test_fresh_compiles_of_hostile_schemas_are_fast(core):
    """Uncached (a distinct title busts the cache), each refusal takes well under the budget."""
    backend = core.info.grammar
    for name, schema in HOSTILE.items():
        spec = GrammarSpec.json_schema({**schema, "title": f"fresh-{name}-{time.time_ns()}"})
        t0 = time.perf_counter()
        with pytest.raises(GrammarError) as exc:
            backend.compile(spec)
        assert time.perf_counter() - t0 < 1.5, name
        assert len(str(exc.value)) < MAX_MESSAGE and exc.value.param == "response_format.json_schema.schema"


def test_recursive_schemas_with_finite_instances_still_work(http):
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["name"],
        "additionalProperties": False}}, "$ref": "#/$defs/node"}
    optional_self = {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
                     "required": ["a"], "additionalProperties": False}
    for schema in (tree, optional_self):
        r = http.post("/v1/chat/completions", json=chat(schema, max_tokens=64))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
        else:
            assert choice["finish_reason"] == "length", choice


def test_limit_hit_mid_generation_ends_only_that_request(core, default_model, monkeypatch):
    """With the compile-time checks turned off, a nested huge regex is only met while generating:
    that request ends with a short error blamed on the request (the server's 400
    request_rejected), while a request in the same batch finishes normally."""
    import mlx_loom.schemas.llguidance_backend as lb

    monkeypatch.setattr(lb, "DRY_RUN_TOKENS", 0)
    monkeypatch.setattr(lb, "STRING_CHECK_BUDGET_S", 0.0)
    backend, tok = core.info.grammar, default_model.tokenizer
    hostile = {"type": "object", "properties": {"ok": {"type": "boolean"}, "s": {"type": "string",
               "pattern": "^a{1000000}$"}}, "required": ["ok", "s"], "title": f"mid-{time.time_ns()}"}
    bad = backend.compile(GrammarSpec.json_schema(hostile))  # passes: the checks are off
    monkeypatch.undo()
    good = backend.compile(GrammarSpec.json_schema(NORMAL))
    prompt = chat_ids(tok, "Answer in JSON.")
    for rid, grammar in (("bad", bad), ("good", good)):
        assert core.add(AddRequest(rid, tuple(prompt), SamplingParams(max_tokens=24, temperature=0.0,
                                                                        grammar=grammar))) is None
    finished, tokens = {}, {"bad": [], "good": []}
    for _ in range(200):
        if not core.has_unfinished():
            break
        for out in core.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out
    bad_out, good_out = finished["bad"], finished["good"]
    assert bad_out.finish_reason == "error" and bad_out.blame == "request", bad_out
    assert len(bad_out.error) < MAX_MESSAGE and "<state>" not in bad_out.error, bad_out.error
    assert "grammar engine" in bad_out.error and "lexer error" in bad_out.error, bad_out.error
    api = as_api_error(RequestRejected(bad_out.error))
    assert (api.status, api.code) == (400, "request_rejected")
    assert good_out.finish_reason == "stop", good_out
    jsonschema.validate(json.loads(tok.decode(tokens["good"])), NORMAL)
    assert not core.has_unfinished() and "bad" not in core.structured


# ---- units: no server ----


def test_short_error_drops_the_parser_dump_and_caps_the_length():
    dump = ("parser error: Too many items (limit 50000; ff_tokens); try avoiding single-byte/short lexemes\n"
            "<state>\nTokens: ⟦{\"⟧\n" + "Parser: {\n  \"rows\": 37502,\n" * 40
            + "</state><grammar>{...}</grammar>")
    assert short_error(dump) == ("parser error: Too many items (limit 50000; ff_tokens); "
                                 "try avoiding single-byte/short lexemes")
    assert short_error("NoExtensionBias\n<non-verbose/>") == "NoExtensionBias"
    long = short_error("x" * 5000)
    assert len(long) == 200 and long.endswith("...")
    assert short_error(None) == short_error("") == "unknown error"


class BrokenMatcher:
    """A Matcher whose engine fails: on its first consume, or already while the mask was filled."""

    DUMP = "lexer error: too many expressions constructed\n<state>\n" + "  \"lexer_cost\": 2056,\n" * 60 + "</state>"

    def __init__(self, failed_in_mask: bool = False) -> None:
        self.failed = failed_in_mask
        self.consumed: list[int] = []

    def consume(self, token: int) -> bool:
        if len(self.consumed) == 1:
            self.failed = True
        if self.failed:
            return False
        self.consumed.append(token)
        return True

    def is_stopped(self) -> bool:
        return False

    def is_accepting(self) -> bool:
        return False

    def rollback(self, num_tokens: int) -> None:
        del self.consumed[len(self.consumed) - num_tokens:]

    def error(self) -> str | None:
        return self.DUMP if self.failed else None


class BrokenBackend:
    vocab_size, mask_words = 64, 2

    def __init__(self, failed_in_mask: bool = False) -> None:
        self.failed_in_mask = failed_in_mask

    def new_matcher(self, grammar):
        return BrokenMatcher(self.failed_in_mask)


def test_grammar_error_mid_generation_is_short_and_cuts_the_bad_token():
    so = StructuredOutput(BrokenBackend())
    so.add("r", CompiledGrammar(GrammarSpec.json_object(), "", 0.0))
    adv = so.advance({"r": [5, 6, 7]}, lambda rid, t: False)  # 5 ok, 6 fails
    message = adv.errors["r"]
    assert len(message) < MAX_MESSAGE and "<state>" not in message and "lexer_cost" not in message, message
    assert "lexer error: too many expressions constructed" in message and "token id 6" in message
    assert adv.kept({"r": [5, 6, 7]})["r"] == [5]


def test_grammar_error_while_filling_the_mask_ends_the_request_without_its_token():
    """A matcher that failed computing its mask (e.g. a lexer limit) allowed only EOS: the EOS must
    not finish the request as a normal "stop"; it gets the error instead."""
    so = StructuredOutput(BrokenBackend(failed_in_mask=True))
    so.add("r", CompiledGrammar(GrammarSpec.json_object(), "", 0.0))
    adv = so.advance({"r": [2]}, lambda rid, t: t == 2)  # 2 is EOS
    assert "r" in adv.errors and len(adv.errors["r"]) < MAX_MESSAGE
    assert adv.kept({"r": [2]})["r"] == []
    assert "r" not in adv.stop_after


def test_recursion_check_has_no_false_positives():
    for name, _, schema in SCHEMAS:
        assert recursion_problem(schema) is None, name
    fine = [
        {"type": "object", "properties": {"a": {"$ref": "#"}}},  # optional recursion
        {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["a"]},
        {"type": "array", "items": {"$ref": "#"}},  # [] is an instance
        {"properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # no type: 1 is an instance
        {"type": ["object", "null"], "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
        {"$defs": {"x": {"$ref": "#/$defs/x"}}, "type": "string"},  # the loop is never used
        {"type": "object", "properties": {"$ref": {"type": "string"}}, "required": ["$ref"]},
        PERSON,
    ]
    for schema in fine:
        assert recursion_problem(schema) is None, schema


def test_recursion_check_names_the_loop():
    msg = recursion_problem(HOSTILE["ref_loop"])
    assert "#/$defs/a -> #/$defs/b -> #/$defs/a" in msg
    assert "#/$defs/node/properties/child" in recursion_problem(HOSTILE["required_recursion_via_defs"])
    deep = {"$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(50)}, "$ref": "#/$defs/d0"}
    deep["$defs"]["d50"] = {"$ref": "#/$defs/d0"}
    assert len(recursion_problem(deep)) < 250


def test_string_constraints_are_found_once_each():
    schema = {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "^x+$"}, "b": {"type": "string", "pattern": "^x+$"},
        "c": {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 9}}},
        "patternProperties": {"^k": {"type": "integer"}}}
    found = string_constraints(schema)
    assert {json.dumps(f, sort_keys=True) for f in found} == {
        json.dumps(f, sort_keys=True) for f in ({"type": "string", "pattern": "^x+$"},
                                                {"type": "string", "minLength": 2, "maxLength": 9},
                                                {"type": "string", "pattern": "^k"})}
    assert len(found) == 3
