"""Structured output inside the continuous batch, on the real default model.

Every corpus schema at temperature 0 and 0.7 runs in ONE engine together with free-text
requests: each "stop" output must parse and validate; anything else must be "length".
"""

import json

import jsonschema
import pytest

from engine_driver import chat_ids, make_core, run
from mlx_loom.sched.params import SamplingParams
from mlx_loom.schemas.grammar import GrammarSpec
from structured_schemas import PERSON, SCHEMAS

MAX_TOKENS = 96
FREE = ["Tell me about the moon.", "What is 2+2?", "Write a haiku about rain.", "Name three birds."]


@pytest.fixture(scope="module")
def core(default_model):
    return make_core(default_model, num_blocks=2048, max_num_seqs=128, budget=512)


def outside_string_whitespace_runs(text: str) -> int:
    """Longest run of whitespace characters outside JSON strings."""
    longest = run_len = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            in_str = not (ch == '"' and not escaped)
            escaped = ch == "\\" and not escaped
            continue
        if ch == '"':
            in_str, run_len = True, 0
        elif ch.isspace():
            run_len += 1
            longest = max(longest, run_len)
        else:
            run_len = 0
    return longest


def test_corpus_mixed_with_free_text_always_validates(core, default_model):
    tok, backend = default_model.tokenizer, core.info.grammar
    requests, schemas = [], {}
    for temp in (0.0, 0.7):
        for name, prompt, schema in SCHEMAS:
            rid = f"{name}@{temp}"
            grammar = backend.compile(GrammarSpec.json_schema(schema, name=name))
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=temp, seed=7, grammar=grammar)
            requests.append((rid, chat_ids(tok, prompt + " Reply with JSON only."), params))
            schemas[rid] = schema
    for i, q in enumerate(FREE):
        requests.append((f"free{i}", chat_ids(tok, q), SamplingParams(max_tokens=24, temperature=0.0)))
    # Joins spread over the first steps so constrained rows enter a batch already decoding.
    results = run(core, requests, {rid: i % 5 for i, (rid, _, _) in enumerate(requests)})
    stopped = 0
    for rid, schema in schemas.items():
        r = results[rid]
        text = tok.decode(r.tokens)
        assert r.finish_reason in ("stop", "length"), (rid, r.finish_reason, r.error)
        assert outside_string_whitespace_runs(text) <= 1, (rid, text)
        if r.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(text), schema)
    assert stopped >= len(schemas) * 0.8, f"only {stopped}/{len(schemas)} finished"
    for i in range(len(FREE)):
        assert results[f"free{i}"].tokens, "free-text rows kept running beside constrained ones"
    assert core.stats().num_blocks_free == core.stats().num_blocks_total


def test_whitespace_bias_stays_bounded(core, default_model):
    tok, backend = default_model.tokenizer, core.info.grammar
    ws = [i for i in range(tok.vocab_size) if tok.decode([i]).strip() == "" and tok.decode([i])]
    bias = tuple((t, 8.0) for t in ws[:300])
    params = SamplingParams(max_tokens=64, temperature=0.0, logit_bias=bias,
                            grammar=backend.compile(GrammarSpec.json_object()))
    r = run(core, [("ws", chat_ids(tok, "Describe a dog as JSON."), params)])["ws"]
    text = tok.decode(r.tokens)
    assert outside_string_whitespace_runs(text) <= 1, text
    if r.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert r.finish_reason == "length"


def test_grammar_stop_ends_request_and_eos_never_early(core, default_model):
    tok, backend = default_model.tokenizer, core.info.grammar
    params = SamplingParams(max_tokens=64, temperature=0.0, grammar=backend.compile(GrammarSpec.json_schema(PERSON)))
    r = run(core, [("p", chat_ids(tok, "Describe a person as JSON."), params)])["p"]
    assert r.finish_reason == "stop"
    doc = json.loads(tok.decode(r.tokens))
    jsonschema.validate(doc, PERSON)
