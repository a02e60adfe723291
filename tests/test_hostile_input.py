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
