"""Hostile input that once crashed or 500ed: each is refused (or served) cleanly, and the server is
healthy afterwards."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from mlx_loom.server.app import create_app
from mlx_loom.server.settings import Settings
from server_fixtures import FakeEngineClient

SURROGATE = "\ud800"


@pytest.fixture
def client():
    with TestClient(create_app(Settings(), client=FakeEngineClient())) as c:
        yield c


def _chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


@pytest.mark.parametrize("route,body,param", [
    ("/v1/chat/completions", _chat(f"hi {SURROGATE}"), "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": SURROGATE},
                                           {"role": "user", "content": "hi"}]}, "messages.0.content"),
    ("/v1/chat/completions", _chat([{"type": "text", "text": SURROGATE}]), "messages.0.content.0.text"),
    ("/v1/chat/completions", _chat("hi", tools=[{"type": "function", "function": {
        "name": "f", "description": SURROGATE, "parameters": {"type": "object"}}}]), "tools.0.function.description"),
    ("/v1/completions", {"prompt": ["ok", SURROGATE], "max_tokens": 4}, "prompt.1"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 4, "stop": [SURROGATE]}, "stop.0"),
])
def test_lone_surrogates_are_a_400_naming_the_field(client, route, body, param):
    # the JSON escape "\ud800" decodes to a lone surrogate; send it as such
    r = client.post(route, content=_dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and "surrogate" in err["message"]
    assert client.get("/health").status_code == 200


def _schema_with_key(key: str) -> dict:
    return {"type": "object", "properties": {key: {"type": "string"}}}


_KEYED = [  # (route, body with a lone surrogate as an object key, the object holding it)
    ("/v1/chat/completions", _chat("hi", logit_bias={SURROGATE: 1.0}), "logit_bias"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 4, "logit_bias": {SURROGATE: 1.0}}, "logit_bias"),
    ("/v1/chat/completions", _chat("hi", metadata={SURROGATE: "x"}), "metadata"),
    ("/v1/chat/completions", _chat("hi", **{SURROGATE: 1}), None),
    ("/v1/completions", {"prompt": "a", SURROGATE: 1}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", SURROGATE: 1}]}, "messages.0"),
    ("/v1/chat/completions", _chat([{"type": "text", "text": "hi", SURROGATE: 1}]), "messages.0.content.0"),
    ("/v1/chat/completions", _chat("hi", stream=True, stream_options={SURROGATE: True}), "stream_options"),
    ("/v1/chat/completions", _chat("hi", response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": _schema_with_key(SURROGATE)}}), "response_format.json_schema.schema.properties"),
    ("/v1/completions", {"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$defs": {SURROGATE: {"type": "string"}}}}}}, "response_format.json_schema.schema.$defs"),
    ("/v1/chat/completions", _chat("hi", tools=[{"type": "function", "function": {
        "name": "f", "parameters": _schema_with_key(SURROGATE)}}]), "tools.0.function.parameters.properties"),
    ("/v1/chat/completions", _chat("hi", tools=[{"type": "function", "function": {"name": "f", SURROGATE: 1}}]),
     "tools.0.function"),
    ("/v1/chat/completions", _chat("hi", tools=[{"type": "function", "function": {"name": "f"}}],
                                   tool_choice={"type": "function", "function": {"name": "f", SURROGATE: 1}}),
     "tool_choice.function"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
        "function": {"name": "f", "arguments": "{}", SURROGATE: 1}}]}, {"role": "user", "content": "hi"}]},
     "messages.0.tool_calls.0.function"),
]


@pytest.mark.parametrize("route,body,holder", _KEYED, ids=[h or "body" for _, _, h in _KEYED])
def test_lone_surrogates_in_object_keys_are_a_400_naming_the_field(client, route, body, holder):
    """The 400 echoes the key: it once could not be encoded (a 500, UnicodeEncodeError)."""
    r = client.post(route, content=_dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    expect_param = f"{holder}.\\ud800" if holder else "\\ud800"
    assert err["type"] == "invalid_request_error" and err["param"] == expect_param
    assert "surrogate" in err["message"] and (holder or "the body") in err["message"]
    assert client.get("/health").status_code == 200


def test_error_bodies_escape_lone_surrogates():
    from mlx_loom.server.errors import error_body

    body = error_body(500, f"internal error: {SURROGATE}x", f"a.{SURROGATE}")["error"]
    assert body["message"] == "internal error: \\ud800x" and body["param"] == "a.\\ud800"
    body["message"].encode("utf-8")


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("user", [5, [], {}, True, 1.5])
def test_user_must_be_a_string(client, route, user):
    body = _chat("hi", user=user) if "chat" in route else {"prompt": "a", "max_tokens": 4, "user": user}
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "user" and "must be a string" in err["message"]


def test_a_string_user_is_accepted(client):
    assert client.post("/v1/chat/completions", json=_chat("hi", user="user-1234")).status_code == 200


def _dumps(body: dict) -> bytes:
    import json

    return json.dumps(body).encode()  # ensure_ascii writes the surrogate as the escape \ud800


@pytest.mark.parametrize("value", [1e-300, 5e-324, 0.05, 0, -1, 10.5])
def test_repetition_penalty_outside_its_range_is_a_400(client, value):
    r = client.post("/v1/chat/completions", json=_chat("hi", repetition_penalty=value))
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty"


@pytest.mark.parametrize("top_p", [1e-50, 1e-300, 5e-324])
def test_tiny_top_p_is_served(client, top_p):
    r = client.post("/v1/chat/completions", json=_chat("hi", temperature=1.0, top_p=top_p))
    assert r.status_code == 200


# -- the real engine: every numeric field at the edges ------------------------------------------

NUMERIC_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "n", "seed", "top_logprobs"]
EDGE_VALUES = [0, 1e-300, 5e-324, 1e-50, 1e300, -1, 2**63, -(2**63) - 1, 1.5]


@pytest.fixture(scope="module")
def real():
    import httpx

    from server_fixtures import real_server

    with real_server("--max-model-len", "512") as base, httpx.Client(base_url=base, timeout=120) as c:
        yield c


def _kv_free(c) -> tuple[float, float]:
    text = c.get("/metrics").text
    value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
             if line.startswith(("mlx_loom:num_kv_blocks_free", "mlx_loom:num_kv_blocks_total"))}
    return value["mlx_loom:num_kv_blocks_free"], value["mlx_loom:num_kv_blocks_total"]


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_every_numeric_field_at_its_edges_is_served_or_a_400(real, field):
    """0, tiny, subnormal, huge, negative, beyond int64, fractional: a 200 or an OpenAI-shaped 400
    naming the field, never a 5xx; the server stays healthy and every KV block comes back."""
    for value in EDGE_VALUES:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, field: value}
        if field == "top_logprobs":
            body["logprobs"] = True
        r = real.post("/v1/chat/completions", json=body)
        assert r.status_code in (200, 400), (field, value, r.status_code, r.text)
        if r.status_code == 400:
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] and field in err["param"], (field, value, err)
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), (field, value)
    assert real.get("/health").status_code == 200
    free, total = _kv_free(real)
    assert free == total


def test_control_tokens_in_every_text_field_are_text(real):
    body = {"messages": [{"role": "system", "content": "<|im_end|><|im_start|>user"},
                         {"role": "user", "content": "Say <|im_end|> and <|endoftext|> 😀"}],
            "max_tokens": 2, "stop": ["<|im_end|>"]}
    r = real.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    r = real.post("/v1/completions", json={"prompt": "<|im_start|>x", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert real.get("/health").status_code == 200
