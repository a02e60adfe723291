"""The real server (`python -m mlx_loom.server.cli serve`, default model) driven by the official openai SDK.

One server process for the module; requests stay short (max_tokens <= 32) so the file runs
in well under two minutes on two CPU cores.
"""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from server_fixtures import real_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    with real_server("--max-num-seqs", "32", "--kv-cache-memory-gb", "0.25", "--max-model-len", "2048",
                     "--served-model-name", "smol", "--log-level", "warning") as base:
        yield base


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def async_sdk(server):
    """A factory: an AsyncOpenAI client's connections belong to one event loop (one asyncio.run)."""
    return lambda: openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def stats(server) -> dict:
    return httpx.get(server + "/v1/engine/stats").json()


def wait_idle(server, timeout=10.0) -> dict:
    """Engine stats once nothing runs and every KV block is back in the pool."""
    deadline = time.time() + timeout
    while True:
        s = stats(server)
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_blocks_free"] == s["num_blocks_total"]:
            return s
        assert time.time() < deadline, f"engine never went idle: {s}"
        time.sleep(0.05)


def test_health_and_models(server, sdk):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    models = sdk.models.list().data
    assert [m.id for m in models] == ["smol"]


def test_engine_stats_name_the_backend(server):
    """Benchmarks record the backend a server actually ran (benchmarks/run_serving.py reads it here)."""
    backend = stats(server)["backend"]
    assert backend.startswith("mlx ") and "affine_qmm" in backend


def test_chat_greedy_answers_with_usage(sdk):
    r = sdk.chat.completions.create(model="smol", messages=QUESTION, max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens is not None


def test_stream_equals_non_stream(sdk):
    kwargs = dict(model="smol", messages=[{"role": "user", "content": "Write one sentence about cats."}],
                  max_tokens=24, temperature=0)
    full = sdk.chat.completions.create(**kwargs)
    chunks = list(sdk.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stop_string_cuts_text(sdk):
    kwargs = dict(model="smol", messages=QUESTION, max_tokens=16, temperature=0)
    text = sdk.chat.completions.create(**kwargs).choices[0].message.content
    word = "Paris"
    assert word in text
    r = sdk.chat.completions.create(**kwargs, stop=[word, "zzzz"])
    assert r.choices[0].message.content == text[: text.index(word)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
        **kwargs, stop=word, stream=True) if c.choices)
    assert streamed == text[: text.index(word)]


def test_seeded_n2_is_reproducible(async_sdk):
    async def go():
        sdk = async_sdk()
        kwargs = dict(model="smol", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16,
                      temperature=1.0, n=2)
        a, b, c = await asyncio.gather(sdk.chat.completions.create(**kwargs, seed=42),
                                       sdk.chat.completions.create(**kwargs, seed=42),
                                       sdk.chat.completions.create(**kwargs, seed=43))
        return a, b, c

    a, b, c = asyncio.run(go())
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert len(a.choices) == 2 and texts(a) == texts(b)
    assert texts(a)[0] != texts(a)[1]  # choice i uses seed + i
    assert texts(c)[0] == texts(a)[1]  # seed 43, choice 0 == seed 42, choice 1
    assert a.usage.prompt_tokens == c.usage.prompt_tokens  # counted once, not per choice
    assert 2 <= a.usage.completion_tokens <= 32


def test_async_stream_n2(async_sdk):
    async def go():
        stream = await async_sdk().chat.completions.create(
            model="smol", messages=QUESTION, max_tokens=12, temperature=0, n=2, stream=True)
        texts = {0: "", 1: ""}
        async for chunk in stream:
            for ch in chunk.choices:
                texts[ch.index] += ch.delta.content or ""
        return texts

    texts = asyncio.run(go())
    assert texts[0] == texts[1] and "Paris" in texts[0]  # greedy: both rows agree


def test_chat_logprobs(sdk):
    r = sdk.chat.completions.create(model="smol", messages=QUESTION, max_tokens=6, temperature=0,
                                    logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
        assert tok.top_logprobs[0].token == tok.token  # greedy takes the most likely token
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_completions_endpoint(sdk):
    r = sdk.completions.create(model="smol", prompt=["The capital of France is", "1, 2, 3,"], max_tokens=8,
                               temperature=0, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.text and c.logprobs and len(c.logprobs.tokens) <= 8 for c in r.choices)
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(
        model="smol", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_32_concurrent_requests_match_single(async_sdk, server):
    prompts = [f"Count from {i} to {i + 5}." for i in range(32)]

    async def ask(p, sdk=None):
        return await (sdk or async_sdk()).chat.completions.create(model="smol", messages=[{"role": "user", "content": p}],
                                                       max_tokens=8, temperature=0)

    async def go():
        sdk = async_sdk()
        return await asyncio.gather(*(ask(p, sdk) for p in prompts))

    results = asyncio.run(go())
    assert len(results) == 32
    for r in results:
        u = r.usage
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.prompt_tokens > 5
        assert u.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
    singles = [asyncio.run(ask(prompts[i])) for i in (0, 17, 31)]  # batched == alone (greedy)
    for i, single in zip((0, 17, 31), singles):
        assert single.choices[0].message.content == results[i].choices[0].message.content
        assert single.usage.prompt_tokens == results[i].usage.prompt_tokens
        assert single.usage.completion_tokens == results[i].usage.completion_tokens
    wait_idle(server)


def test_disconnect_frees_blocks(server):
    wait_idle(server)
    long = {"messages": [{"role": "user", "content": "Write a long essay about the sea."}],
            "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server + "/v1/chat/completions", json={**long, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines), next(lines)
        busy = stats(server)
        assert busy["num_running"] == 1 and busy["num_blocks_free"] < busy["num_blocks_total"]
    wait_idle(server, timeout=5)

    failed = []
    thread = threading.Thread(target=lambda: _expect_timeout(server, long, failed))
    thread.start()
    deadline = time.time() + 10
    while stats(server)["num_running"] == 0:
        assert time.time() < deadline
        time.sleep(0.02)
    thread.join()
    assert failed == ["timeout"]
    wait_idle(server, timeout=5)


def _expect_timeout(server, body, out):
    try:
        httpx.post(server + "/v1/chat/completions", json=body, timeout=1.5)
        out.append("finished")
    except httpx.ReadTimeout:
        out.append("timeout")


@pytest.mark.parametrize("raw,status", [
    (b"{", 400), (b"[]", 400), (b'{"messages": "hi"}', 400),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', 400),
    (b'{"messages": [{"role": "user", "content": "x"}], "foo": 1}', 400),
    (b'{"messages": [{"role": "user", "content": "x"}], "model": "gpt-4o"}', 404),
])
def test_malformed_bodies(server, raw, status):
    r = httpx.post(server + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_limits(server):
    r = httpx.post(server + "/v1/completions", json={"prompt": "hello " * 3000, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(server + "/v1/completions", json={"prompt": "x" * (5 * 2**20)})
    assert r.status_code == 413
    assert httpx.get(server + "/nope").status_code == 404
    assert httpx.get(server + "/health").status_code == 200  # still serving after all that


# ---- structured output (response_format) ----

PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer",
                 "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
PERSON_Q = [{"role": "user", "content": "Invent a person. Reply with JSON."}]


def test_json_schema_chat_n2_validates(sdk):
    import jsonschema

    r = sdk.chat.completions.create(model="smol", messages=PERSON_Q, max_tokens=48, temperature=0.7, n=2, seed=3,
                                    response_format=PERSON_FORMAT)
    for ch in r.choices:
        assert ch.finish_reason in ("stop", "length")
        if ch.finish_reason == "stop":
            jsonschema.validate(json.loads(ch.message.content), PERSON_SCHEMA)
            assert not getattr(ch, "validation_error", None)


def test_json_object_stream_equals_non_stream(sdk):
    # Greedy, this prompt closes the object in 16 tokens: {"name": "Felicia", "color": "red"} (unconstrained,
    # the model opens a ```json fence instead). An open-ended prompt ("Describe a cat as JSON.") keeps
    # nesting keys past any small max_tokens, so it would never reach the validity check.
    kwargs = dict(model="smol", messages=[{"role": "user", "content": "Describe a cat as JSON with keys name and "
                                           "color."}], max_tokens=48, temperature=0,
                  response_format={"type": "json_object"})
    whole = sdk.chat.completions.create(**kwargs).choices[0]
    streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(**kwargs, stream=True)
                       if c.choices)
    assert streamed == whole.message.content
    assert whole.finish_reason == "stop", whole.message.content
    assert isinstance(json.loads(whole.message.content), dict) and not getattr(whole, "validation_error", None)


def test_completions_json_schema_strict_or_not(sdk):
    """strict: false is accepted and constrained exactly like strict: true (unconstrained, greedy output
    here is a ``` fenced block)."""
    import jsonschema

    texts = []
    for strict in (True, False):
        fmt = {"type": "json_schema", "json_schema": {**PERSON_FORMAT["json_schema"], "strict": strict}}
        r = sdk.completions.create(model="smol", prompt="A person as JSON:", max_tokens=48, temperature=0,
                                   extra_body={"response_format": fmt})
        assert r.choices[0].finish_reason == "stop", r.choices[0].text
        jsonschema.validate(json.loads(r.choices[0].text), PERSON_SCHEMA)
        texts.append(r.choices[0].text)
    assert texts[0] == texts[1]


@pytest.mark.parametrize("schema,needle", [({"type": "strin"}, "strin"), ({"$ref": "#/$defs/nope"}, "nope"),
                                           ({"type": "string", "pattern": "(("}, "regex")])
def test_invalid_schema_is_400_before_generation(sdk, server, schema, needle):
    """Not valid JSON Schema: a 400 whatever strict says (best effort only serves valid schemas)."""
    before = stats(server)["steps"]
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="smol", messages=PERSON_Q, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": schema}})
    assert needle in str(err.value) and err.value.body["param"].startswith("response_format")
    assert stats(server)["steps"] == before


def test_outlines_openai_client_gets_valid_output(server):
    """outlines as a real client: its OpenAI integration sends a strict json_schema."""
    import outlines
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str
        species: str
        legs: int = Field(ge=0, le=8)

    model = outlines.from_openai(openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0), "smol")
    out = model("Invent a pet. Reply with JSON.", Pet, max_tokens=64, temperature=0)
    pet = Pet.model_validate_json(out)
    assert 0 <= pet.legs <= 8


# ---- tools ----

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"},
                  "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
                  "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"tz": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
               "required": ["tz"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone",
                                           "parameters": TIME_PARAMS}}]
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
WEATHER_Q = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.mark.parametrize("temperature", [0, 0.7])
def test_required_tool_calls_are_valid_calls(sdk, temperature):
    import jsonschema

    r = sdk.chat.completions.create(model="smol", messages=WEATHER_Q, tools=TOOLS, tool_choice="required",
                                    max_tokens=48, temperature=temperature, n=2, seed=5)
    for ch in r.choices:
        assert ch.finish_reason in ("tool_calls", "length") and ch.message.content is None
        calls = ch.message.tool_calls
        assert calls and all(c.type == "function" and c.function.name in PARAMS for c in calls)
        if ch.finish_reason == "tool_calls":
            for c in calls:
                jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])
            assert not getattr(ch, "validation_error", None)


def test_named_tool_stream_equals_non_stream(sdk):
    import jsonschema

    kwargs = dict(model="smol", messages=WEATHER_Q, tools=TOOLS, max_tokens=48, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = sdk.chat.completions.create(**kwargs).choices[0]
    (call,) = whole.message.tool_calls
    assert whole.finish_reason == "tool_calls" and call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME_PARAMS)
    deltas = [tc for c in sdk.chat.completions.create(**kwargs, stream=True) if c.choices
              for tc in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id and deltas[0].function.name == "get_time" and len(deltas) > 1
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_auto_tools_answer_is_text_or_known_calls(sdk):
    ch = sdk.chat.completions.create(model="smol", messages=WEATHER_Q, tools=TOOLS, max_tokens=32,
                                     temperature=0).choices[0]
    if ch.message.tool_calls:
        assert ch.finish_reason == "tool_calls"
        assert all(c.function.name in PARAMS and isinstance(json.loads(c.function.arguments), dict)
                   for c in ch.message.tool_calls)
    else:
        assert ch.message.content and ch.finish_reason in ("stop", "length")
    # The answer to a call goes back in as a "tool" message, and the model continues in text.
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    follow = WEATHER_Q + [{"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "clear"}'}]
    answer = sdk.chat.completions.create(model="smol", messages=follow, tools=TOOLS, tool_choice="none",
                                         max_tokens=24, temperature=0).choices[0]
    assert answer.message.content and not answer.message.tool_calls


# ---- metrics (last: it reads what the tests above served) ----

def test_metrics_after_traffic(server, sdk):
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(2):  # the second finds the first's prompt in the prefix cache
        sdk.chat.completions.create(model="smol", messages=QUESTION, max_tokens=2, temperature=0)
    wait_idle(server)
    text = httpx.get(server + "/metrics").text
    m = {s.name.removeprefix("mlx_loom:"): s.value for f in text_string_to_metric_families(text)
         for s in f.samples if not s.labels}
    assert m["num_kv_blocks_free"] == m["num_kv_blocks_total"] > 0  # idle: every block back in the pool
    assert m["num_requests_running"] == m["num_requests_waiting"] == m["kv_cache_usage_perc"] == 0
    assert m["prompt_tokens_total"] > 0 and m["generation_tokens_total"] > 0 and m["engine_steps_total"] > 0
    assert m["prefix_cache_hits_total"] > 0 and 0 < m["prefix_cache_hit_rate"] <= 1
    assert m["time_to_first_token_seconds_count"] >= 2 and m["e2e_request_latency_seconds_count"] >= 2
