"""tools / tool_choice through the HTTP routes, against the scripted fake engine.

The fake engine answers with whatever follows "ECHO:" in the prompt, so each test scripts the
model's output and checks what the server makes of it (the real model's constrained calls are
in test_server_real.py).
"""

import json

import pytest
from fastapi.testclient import TestClient

from mlx_loom.server.app import create_app
from mlx_loom.server.settings import Settings
from server_fixtures import ByteTokenizer, FakeEngineClient
from test_server_api import assert_error, sse

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, CLOCK]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.fixture
def api():
    fake = FakeEngineClient(max_model_len=4096, grammar=True)
    with TestClient(create_app(Settings(), client=fake)) as http:
        yield http, fake


def chat(echo: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": f"weather? ECHO:{echo}"}], "temperature": 0,
            "tools": TOOLS, **extra}


def prompt_text(fake) -> str:
    return ByteTokenizer().decode(fake.submitted[-1][1])


def streamed(http, body: dict) -> tuple[str, dict[int, dict], list[str], list[dict]]:
    """(content, calls by index with arguments joined, finish reasons, tool-call deltas)."""
    events = sse(http.post("/v1/chat/completions", json={**body, "stream": True}))
    assert events[-1] == "[DONE]"
    content, calls, finishes, deltas = "", {}, [], []
    for chunk in events[:-1]:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                deltas.append(tc)
                if tc["id"] is not None:
                    calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"] or ""
            if choice["finish_reason"]:
                finishes.append(choice["finish_reason"])
    return content, calls, finishes, deltas


def test_auto_parses_a_call_and_shows_the_tools(api):
    http, fake = api
    body = http.post("/v1/chat/completions", json=chat(f"<tool_call>{CALL}</tool_call>")).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    prompt = prompt_text(fake)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt and "<tool_call>" in prompt
    assert fake.submitted[-1][2].grammar is None  # auto: the model may also answer in text


def test_auto_stream_matches_non_stream(api):
    http, _ = api
    body = chat(f"Let me check. <tool_call>{CALL}</tool_call>")
    message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    content, calls, finishes, deltas = streamed(http, body)
    assert content == message["content"] == "Let me check. "
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert deltas[0]["type"] == "function" and finishes == ["tool_calls"]


def test_auto_plain_answer_is_content(api):
    http, _ = api
    choice = http.post("/v1/chat/completions", json=chat("It is sunny.")).json()["choices"][0]
    assert choice == {**choice, "finish_reason": "stop", "message": {"role": "assistant", "content": "It is sunny."}}


def test_required_is_constrained_to_a_call_list(api):
    http, fake = api
    echo = f'[{CALL}, {{"name": "get_time", "arguments": {{}}}}]'
    body = http.post("/v1/chat/completions", json=chat(echo, tool_choice="required", n=2)).json()
    for choice in body["choices"]:
        assert choice["finish_reason"] == "tool_calls" and "validation_error" not in choice
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather", "get_time"]
    schema = json.loads(fake.submitted[-1][2].grammar.spec.schema)
    assert schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert schema["items"]["anyOf"][0]["properties"]["name"] == {"const": "get_weather"}
    one = json.loads(fake.submitted[-1][2].grammar.spec.schema)
    http.post("/v1/chat/completions", json=chat(echo, tool_choice="required", parallel_tool_calls=False))
    assert json.loads(fake.submitted[-1][2].grammar.spec.schema)["maxItems"] == 1 and "maxItems" not in one


def test_required_stream_sends_arguments_in_pieces(api):
    http, _ = api
    content, calls, finishes, deltas = streamed(http, chat(f"[{CALL}]", tool_choice="required"))
    assert content == "" and finishes == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]
    assert len(deltas) > 3 and all(d["id"] is None for d in deltas[1:])  # one token per delta here


def test_named_function_output_is_its_arguments(api):
    http, fake = api
    choice_of = {"type": "function", "function": {"name": "get_weather"}}
    body = http.post("/v1/chat/completions", json=chat('{"city": "Oslo"}', tool_choice=choice_of)).json()
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert json.loads(fake.submitted[-1][2].grammar.spec.schema) == WEATHER["function"]["parameters"]
    content, calls, finishes, _ = streamed(http, chat('{"city": "Oslo"}', tool_choice=choice_of))
    assert calls[0]["arguments"] == '{"city": "Oslo"}' and finishes == ["tool_calls"]


def test_constrained_output_that_fails_validation_is_reported(api):
    http, _ = api
    choice_of = {"type": "function", "function": {"name": "get_weather"}}
    choice = http.post("/v1/chat/completions", json=chat('{"town": "Oslo"}', tool_choice=choice_of)).json()["choices"][0]
    assert "city" in choice["validation_error"]


def test_tool_strict_picks_exact_or_best_effort(api):
    """function.strict true compiles strictly, false / absent best effort (OpenAI's default); the schema
    is the same and so is the validation of the finished output."""
    http, fake = api
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice in ("required", named):
        specs = []
        for strict in (True, False, None):
            fn = {**WEATHER["function"], **({} if strict is None else {"strict": strict})}
            body = chat('{"town": "Oslo"}', tools=[{"type": "function", "function": fn}, CLOCK],
                        tool_choice=tool_choice)
            choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
            assert choice["validation_error"]  # the wrong output is reported under strict false too
            specs.append(fake.submitted[-1][2].grammar.spec)
        assert specs[0].kind == "json_schema" and specs[0].schema == specs[1].schema == specs[2].schema, tool_choice
        # "required" is one grammar for every tool: strict only if every function is (CLOCK is not).
        assert [s.strict for s in specs] == [tool_choice != "required", False, False], tool_choice


def test_response_format_strict_picks_exact_or_best_effort(api):
    """json_schema.strict true compiles strictly, false / absent best effort; the schema is the same and
    so is the validation of the finished output."""
    http, fake = api
    schema = WEATHER["function"]["parameters"]
    prompts = {"/v1/chat/completions": lambda echo: {"messages": [{"role": "user", "content": f"ECHO:{echo}"}]},
               "/v1/completions": lambda echo: {"prompt": f"ECHO:{echo}"}}
    for route, prompt in prompts.items():
        specs = []
        for strict in (True, False, None):
            fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema,
                                                          **({} if strict is None else {"strict": strict})}}
            for echo, valid in (('{"city": "Oslo"}', True), ('{"town": "Oslo"}', False)):
                r = http.post(route, json={**prompt(echo), "temperature": 0, "max_tokens": 64, "response_format": fmt})
                choice = r.json()["choices"][0]
                assert choice["finish_reason"] == "stop" and ("validation_error" not in choice) == valid, (route, strict)
                specs.append(fake.submitted[-1][2].grammar.spec)
        assert specs[0].kind == "json_schema" and json.loads(specs[0].schema) == schema
        assert all(s.schema == specs[0].schema for s in specs), route
        assert [s.strict for s in specs] == [True, True, False, False, False, False], route


def test_cut_call_finishes_with_length(api):
    http, _ = api
    choice = http.post("/v1/chat/completions",
                       json=chat(f"[{CALL}]", tool_choice="required", max_tokens=45)).json()["choices"][0]
    assert choice["finish_reason"] == "length" and "validation_error" not in choice  # only "stop" is checked
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city"'}


def test_none_hides_tools_and_parses_nothing(api):
    http, fake = api
    text = f"<tool_call>{CALL}</tool_call>"
    choice = http.post("/v1/chat/completions", json=chat(text, tool_choice="none")).json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text} and choice["finish_reason"] == "stop"
    assert "<tools>" not in prompt_text(fake)


def test_earlier_calls_and_results_are_rendered(api):
    http, fake = api
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather in Paris and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    ]
    r = http.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS})
    assert r.status_code == 200, r.text
    prompt = prompt_text(fake)
    assert prompt.startswith("<system>Be brief.\n\n# Tools")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<user><tool_response>\n18C\n</tool_response>\n<tool_response>\nnoon\n</tool_response>" in prompt


@pytest.mark.parametrize("extra,param,contains", [
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name", "nope"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name", "a-z"),
    ({"tools": [CLOCK, CLOCK]}, "tools.1.function.name", "twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters", "object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}]},
     "tools.0.function.parameters", "properties"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strictness": 1}}]},
     "tools.0.function.strictness", "strictness"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format", "tool_choice"),
    ({"function_call": "auto"}, "function_call", "tool_choice"),
])
def test_bad_tool_requests_are_400(api, extra, param, contains):
    http, fake = api
    before = len(fake.submitted)
    assert_error(http.post("/v1/chat/completions", json={**chat("x"), **extra}), 400, param, contains)
    assert len(fake.submitted) == before


def test_bad_tool_messages_are_400(api):
    http, _ = api
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    body = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]}
    assert_error(http.post("/v1/chat/completions", json=body), 400, "messages.1.tool_calls.0.function.arguments")
    body = {"messages": [{"role": "user", "content": "x", "tool_calls": [{**call, "function": {"name": "f", "arguments": "{}"}}]}]}
    assert_error(http.post("/v1/chat/completions", json=body), 400, "messages.0.tool_calls")


def _nested_tool(name: str, inner: dict) -> dict:
    """Parameters as pydantic writes a nested model: the inner model under $defs, a $ref to it,
    a self-reference ("#"), and data ("const") that merely looks like a ref."""
    return {"name": name, "parameters": {
        "type": "object", "$defs": {"Item": inner},
        "properties": {"item": {"$ref": "#/$defs/Item"}, "again": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
                       "tag": {"const": {"$ref": "#/$defs/Item"}}},
        "required": ["item"]}}


def test_required_wrapper_keeps_each_tools_local_refs():
    """Two tools whose $defs share a name with different schemas: each call's arguments are checked
    against its own tool's definitions, recursion included."""
    import jsonschema

    from mlx_loom.server.protocol import ChatCompletionRequest
    from mlx_loom.server.tools import tool_plan

    tools = [{"type": "function", "function": _nested_tool("a", {"type": "integer"})},
             {"type": "function", "function": _nested_tool("b", {"type": "string"})}]
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=tools, tool_choice="required")
    schema = tool_plan(req)._calls_schema()
    jsonschema.validators.validator_for(schema).check_schema(schema)
    ok = [{"name": "a", "arguments": {"item": 1, "again": {"item": 2}}}, {"name": "b", "arguments": {"item": "s"}},
          {"name": "a", "arguments": {"item": 3, "tag": {"$ref": "#/$defs/Item"}}}]
    jsonschema.validate(ok, schema)
    for bad in ([{"name": "a", "arguments": {"item": "s"}}], [{"name": "b", "arguments": {"item": 1}}],
                [{"name": "a", "arguments": {"item": 1, "again": {"item": "s"}}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_required_with_nested_refs_compiles(api):
    http, _ = api
    tool = {"type": "function", "function": _nested_tool("a", {"type": "object", "properties": {
        "name": {"type": "string"}}, "required": ["name"]})}
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": 'ECHO:[{"name": "a", "arguments": {"item": {"name": "x"}}}]'}],
        "tools": [tool], "tool_choice": "required", "max_tokens": 64})
    assert r.status_code == 200, r.text
    call = r.json()["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "a" and json.loads(call["arguments"]) == {"item": {"name": "x"}}
