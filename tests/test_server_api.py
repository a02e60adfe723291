"""HTTP routes against a scripted fake engine: shapes, streaming, stop strings, n, errors."""

import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from mlx_loom.server.app import create_app
from mlx_loom.server.settings import Settings
from server_fixtures import ByteTokenizer, FakeEngineClient, reply_text, serve_in_thread

GREEDY_REPLY = reply_text(None, type("P", (), {"temperature": 0})())
CHAT = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def make(client=None, **settings):
    fake = client or FakeEngineClient()
    return TestClient(create_app(Settings(**settings), client=fake)), fake


@pytest.fixture
def api():
    http, fake = make()
    with http:
        yield http, fake


def sse(resp) -> list:
    """Parsed `data:` payloads of an SSE body ("[DONE]" kept as a string)."""
    events = []
    for block in resp.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(resp, status, param=None, contains=""):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert contains.lower() in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---- lifecycle ----

def test_health_is_503_while_loading_then_200():
    http, _ = make(FakeEngineClient(load_time=0.5))
    with http:
        r = http.get("/health")
        assert_error(r, 503, contains="loading")
        assert_error(http.post("/v1/chat/completions", json=CHAT), 503)
        time.sleep(0.7)
        assert http.get("/health").status_code == 200
        models = http.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "fake-model"


def test_failed_load_keeps_503_with_reason():
    http, _ = make(FakeEngineClient(fail_load="no such tensor"))
    with http:
        time.sleep(0.05)
        assert_error(http.get("/health"), 503, contains="no such tensor")
        assert_error(http.post("/v1/completions", json={"prompt": "x"}), 503, contains="no such tensor")


def test_openapi_docs(api):
    http, _ = api
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(paths)


# ---- chat ----

def test_chat_non_streaming(api):
    http, fake = api
    r = http.post("/v1/chat/completions", json={**CHAT, "model": "fake-model", "user": "u1"})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": GREEDY_REPLY}
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    prompt_len = len(ByteTokenizer().encode("<user>hi\n<assistant>"))
    n_out = len(GREEDY_REPLY.encode())
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": n_out,
                             "total_tokens": prompt_len + n_out, "prompt_tokens_details": {"cached_tokens": 0}}


def test_chat_max_tokens_gives_length(api):
    http, _ = api
    for field in ("max_tokens", "max_completion_tokens"):
        body = http.post("/v1/chat/completions", json={**CHAT, field: 5}).json()
        assert body["choices"][0]["message"]["content"] == "Hello"
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5


def test_chat_stream_equals_non_stream(api):
    http, _ = api
    r = http.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == GREEDY_REPLY and "\ufffd" not in text  # multi-byte characters never split
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(GREEDY_REPLY.encode())


def test_stop_string_cut_and_request_aborted(api):
    http, fake = api
    body = http.post("/v1/chat/completions", json={**CHAT, "stop": ["STOP", "zzz"]}).json()
    assert body["choices"][0]["message"]["content"] == GREEDY_REPLY.split("STOP")[0]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert fake.aborted and not fake.active  # the engine stopped generating at the stop string
    r = http.post("/v1/chat/completions", json={**CHAT, "stop": "STOP", "stream": True})
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in sse(r)[:-1] if c["choices"])
    assert text == GREEDY_REPLY.split("STOP")[0] and "ST" not in text


def test_n_choices_use_seed_plus_index(api):
    http, fake = api
    req = {"messages": [{"role": "user", "content": "hi"}], "n": 3, "seed": 7, "temperature": 0.8}
    body = http.post("/v1/chat/completions", json=req).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert sorted(p.seed for _, _, p in fake.submitted[-3:]) == [7, 8, 9]
    again = http.post("/v1/chat/completions", json=req).json()
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in body["choices"]]
    assert body["usage"]["completion_tokens"] == sum(
        len(c["message"]["content"].encode()) for c in body["choices"])
    r = http.post("/v1/chat/completions", json={**req, "stream": True})
    texts = {}
    for c in sse(r)[:-1]:
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + (ch["delta"].get("content") or "")
    assert [texts[i] for i in range(3)] == [c["message"]["content"] for c in body["choices"]]


def test_chat_logprobs_shape(api):
    http, _ = api
    body = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "logprobs": True,
                                                   "top_logprobs": 2}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["H", "e", "l"]
    assert content[0]["logprob"] == -0.25 and content[0]["bytes"] == [72]
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-0.25, -1.25]
    r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "logprobs": True, "stream": True})
    streamed = [t for c in sse(r)[:-1] for ch in c["choices"] for t in ((ch.get("logprobs") or {}).get("content") or [])]
    assert [t["token"] for t in streamed] == ["H", "e", "l"]


def test_text_parts_and_developer_role(api):
    http, fake = api
    msgs = [{"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2}).status_code == 200
    assert ByteTokenizer().decode(fake.submitted[-1][1]) == "<system>be brief\n<user>ab\n<assistant>"


# ---- completions ----

def test_completions_prompt_shapes_and_usage(api):
    http, _ = api
    ids = ByteTokenizer().encode("abc")
    for prompt, n_prompts in (("abc", 1), (["abc", "de"], 2), (ids, 1), ([ids, ids[:2]], 2)):
        body = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0, "n": 2}).json()
        assert body["object"] == "text_completion" and len(body["choices"]) == 2 * n_prompts
        assert all(c["text"] == "Hell" and c["finish_reason"] == "length" for c in body["choices"])
        assert body["usage"]["completion_tokens"] == 8 * n_prompts
    body = http.post("/v1/completions", json={"prompt": ["abc", "de"], "max_tokens": 1}).json()
    assert body["usage"]["prompt_tokens"] == 5


def test_completions_default_max_tokens_is_16(api):
    http, _ = api
    body = http.post("/v1/completions", json={"prompt": "x", "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"


def test_completions_logprobs_and_stream(api):
    http, _ = api
    req = {"prompt": "x", "max_tokens": 3, "temperature": 0, "logprobs": 2}
    lp = http.post("/v1/completions", json=req).json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["H", "e", "l"] and lp["token_logprobs"] == [-0.25] * 3
    assert lp["text_offset"] == [0, 1, 2] and len(lp["top_logprobs"][0]) == 2
    events = sse(http.post("/v1/completions", json={**req, "stream": True,
                                                   "stream_options": {"include_usage": True}}))
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 3
    chunks = [c for c in events[:-1] if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hel"
    assert [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]] == [0, 1, 2]


# ---- errors ----

@pytest.mark.parametrize("body,status,param,contains", [
    ({**CHAT, "temperature": -1}, 400, "temperature", ""),
    ({**CHAT, "top_p": 0}, 400, "top_p", ""),
    ({**CHAT, "n": 0}, 400, "n", ""),
    ({**CHAT, "top_logprobs": 3}, 400, "top_logprobs", "logprobs"),
    ({**CHAT, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs", ""),
    ({"messages": []}, 400, "messages", ""),
    ({**CHAT, "functions": [{"name": "f"}]}, 400, "functions", "use 'tools'"),
    ({**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format", "not available"),
    ({**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema", "schema"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "frob": 1}}},
     400, "response_format.json_schema.frob", "frob"),
    ({**CHAT, "frobnicate": 1}, 400, "frobnicate", "frobnicate"),
    ({**CHAT, "stream_options": {"include_usage": True, "chunk_size": 3}}, 400, "stream_options.chunk_size", ""),
    ({**CHAT, "model": "gpt-4"}, 404, "model", "gpt-4"),
    ({**CHAT, "stop": ""}, 400, "stop", "non-empty"),
    ({**CHAT, "stop": ["a"] * 17}, 400, "stop", ""),
    ({**CHAT, "logit_bias": {"abc": 1}}, 400, "logit_bias", ""),
    ({**CHAT, "logit_bias": {"999999": 1}}, 400, "logit_bias", "vocabulary"),
    ({**CHAT, "logit_bias": {"5": 500}}, 400, "logit_bias", ""),
    ({**CHAT, "max_tokens": 100000}, 400, "max_tokens", "context"),
    ({"messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages", "context"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content.0.type", "image_url"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.tool_call_id", "tool_call_id"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", ""),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "RAISE"}]},
     400, "messages", "alternate"),
    ({"messages": [{"role": "user", "content": "REJECT me"}]}, 400, None, "KV blocks"),
])
def test_chat_bad_values_are_400(api, body, status, param, contains):
    http, _ = api
    assert_error(http.post("/v1/chat/completions", json=body), status, param, contains)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": [], "max_tokens": 1}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [5, 99999]}, "prompt"),
    ({"prompt": [[5], [-1]]}, "prompt"),
    ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"prompt": "x", "logprobs": 30}, "logprobs"),
])
def test_completions_bad_values_are_400(api, body, param):
    http, _ = api
    assert_error(http.post("/v1/completions", json=body), 400, param)


def test_harmless_fields_accepted(api):
    http, _ = api
    extras = {"user": "u", "metadata": {"a": "b"}, "store": False, "response_format": {"type": "text"},
              "tools": None, "parallel_tool_calls": True, "seed": None, "max_tokens": 2}
    assert http.post("/v1/chat/completions", json={**CHAT, **extras}).status_code == 200


@pytest.mark.parametrize("raw", [b"{", b"not json", b"[1, 2]", b'"str"', b"", b"null", b'{"messages": 5}',
                                 b'{"messages": [{"role": "user"}]}', b'{"messages": [{"content": "x"}]}',
                                 b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
                                 b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}'])
def test_malformed_bodies_are_openai_shaped_4xx(api, raw):
    http, _ = api
    r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_invalid_json_is_400_with_reworded_message(api):
    http, _ = api
    err = assert_error(http.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}),
                       400, contains="not valid JSON")
    assert err["type"] == "invalid_request_error"


def test_unknown_route_and_method(api):
    http, _ = api
    assert_error(http.get("/v1/nothing"), 404, contains="/v1/nothing")
    assert_error(http.get("/v1/chat/completions"), 405)


def test_body_too_large_is_413():
    http, _ = make(max_request_bytes=2048)
    with http:
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        err = assert_error(http.post("/v1/chat/completions", json=big), 413)
        assert err["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted while reading
            for _ in range(10):
                yield b" " * 1000

        r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert_error(r, 413)


def test_engine_death_mid_request_is_503_or_error_event(api):
    http, _ = api
    msg = {"messages": [{"role": "user", "content": "DIE"}]}
    assert_error(http.post("/v1/chat/completions", json=msg), 503, contains="boom")
    events = sse(http.post("/v1/chat/completions", json={**msg, "stream": True}))
    assert events[-1] == "[DONE]" and "boom" in events[-2]["error"]["message"]


def test_rejection_in_stream_is_error_event(api):
    http, _ = api
    events = sse(http.post("/v1/completions", json={"prompt": "REJECT", "stream": True}))
    assert events[-2]["error"]["message"] and events[-1] == "[DONE]"


def test_junk_never_gives_500(api):
    import random

    http, _ = api
    rng = random.Random(0)
    values = [None, -1, 0, 1, 2.5, 1e309, "x", "", [], {}, [1], ["a"], {"a": 1}, True, 2**70, -(2**70)]
    fields = ["messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed",
              "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
              "top_logprobs", "stream", "stream_options", "user", "model", "max_completion_tokens", "echo"]
    for i in range(300):
        body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 3}
        for f in rng.sample(fields, 3):
            body[f] = rng.choice(values)
        path = rng.choice(["/v1/chat/completions", "/v1/completions"])
        r = http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        assert r.status_code < 500, (body, r.text)


# ---- disconnects (real sockets) ----

def test_client_disconnect_aborts_streaming_and_non_streaming():
    fake = FakeEngineClient()
    with serve_in_thread(create_app(Settings(), client=fake)) as base:
        slow = {"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 60}
        with httpx.Client(base_url=base) as http:
            with http.stream("POST", "/v1/chat/completions", json={**slow, "stream": True}) as r:
                lines = r.iter_lines()
                next(lines)  # the role chunk may precede the engine request: wait for it
                _wait_until(lambda: fake.active)
        _wait_until(lambda: not fake.active)
        assert len(fake.aborted) == 1
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/chat/completions", json=slow, timeout=1.0)  # the reply takes 3 s
        _wait_until(lambda: not fake.active)
        assert len(fake.aborted) == 2


def _wait_until(cond, timeout=5.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)
