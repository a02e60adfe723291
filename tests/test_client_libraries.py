"""Client libraries that send nested pydantic schemas, against the real server (default model):
the openai SDK's `chat.completions.parse` with a `pydantic_function_tool` and tool_choice "required",
and pydantic-ai's structured output (an output tool it forces with tool_choice "required"). Both put
the nested model under "$defs" with "$ref"s to it; the required-calls wrapper once left those refs
pointing at nothing (400 "Pointer '/$defs/Person' does not exist")."""

from __future__ import annotations

import openai
import pytest
from pydantic import BaseModel, Field

from server_fixtures import real_server


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


class Meeting(BaseModel):
    """A meeting: who organizes it and where."""

    organizer: Person
    room: str = Field(max_length=12)


PROMPT = "Alice, 30, organizes a meeting in room B12. Record the meeting."


@pytest.fixture(scope="module")
def server():
    with real_server("--max-num-seqs", "4", "--kv-cache-memory-gb", "0.25", "--max-model-len", "2048",
                     "--served-model-name", "smol", "--log-level", "warning") as base:
        yield base


def test_pydantic_tool_schema_is_nested():
    params = openai.pydantic_function_tool(Meeting)["function"]["parameters"]
    assert "$defs" in params and params["properties"]["organizer"] == {"$ref": "#/$defs/Person"}


def test_openai_sdk_parse_with_a_nested_pydantic_tool_and_required_choice(server):
    sdk = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = sdk.chat.completions.parse(model="smol", messages=[{"role": "user", "content": PROMPT}],
                                   tools=[openai.pydantic_function_tool(Meeting)], tool_choice="required",
                                   parallel_tool_calls=False, temperature=0, max_tokens=160)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "Meeting"
    meeting = calls[0].function.parsed_arguments
    assert isinstance(meeting, Meeting) and isinstance(meeting.organizer, Person)
    assert 0 <= meeting.organizer.age <= 120 and len(meeting.room) <= 12


def test_pydantic_ai_structured_output_with_a_nested_model(server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    provider = OpenAIProvider(base_url=server + "/v1", api_key="unused")
    model = OpenAIChatModel("smol", provider=provider)
    agent = Agent(model, output_type=Meeting, model_settings=ModelSettings(temperature=0, max_tokens=160))
    result = agent.run_sync(PROMPT)
    assert isinstance(result.output, Meeting) and isinstance(result.output.organizer, Person)
    assert 0 <= result.output.organizer.age <= 120
