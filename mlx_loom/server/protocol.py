"""OpenAI request and response models (pydantic), and the policy for fields we do not serve.

Requests accept extra fields at parse time so that `unsupported_fields` can name them in a
400: an unknown field that would change behaviour is refused, never silently ignored.
Value ranges mirror mlx_loom.sched.params.SamplingParams (the engine's own checks still run).
Numbers and booleans are strict (StrictInt / StrictFloat / StrictBool): "4", "yes" or 1.5 for an
integer are refused with a 400 naming the field, never coerced, as OpenAI does. StrictFloat still
takes a JSON integer (temperature: 1).
"""

from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_serializer, model_validator

from mlx_loom.server.errors import bad_request

INT64 = 2**63

# Accepted and ignored: they do not change what the model generates.
HARMLESS_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention", "include_obfuscation",
})
# The pre-tools function-calling fields: refused with the name of their replacement.
DEPRECATED_FIELDS = {"functions": "is deprecated and not served; use 'tools'",
                     "function_call": "is deprecated and not served; use 'tool_choice'"}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: StrictBool | None = False
    """Send one last chunk with the usage of the whole request (choices: [])."""


class ContentPart(_Open):
    type: str
    """Only "text" parts are served."""
    text: str | None = None


class JsonSchemaFormat(_Open):
    name: str | None = None
    description: str | None = None
    schema_: dict | StrictBool | None = Field(None, alias="schema")
    """The JSON Schema the output must match."""
    strict: StrictBool | None = None
    """true: the output matches the schema exactly, or a 400 lists every part that cannot be enforced.
    false / absent: best effort (unenforceable parts relaxed; a finished output that does not validate
    carries validation_error on its choice)."""


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Open):
    name: str
    """1-64 characters from a-z, A-Z, 0-9, '_' and '-'."""
    description: str | None = None
    parameters: dict | None = None
    """JSON Schema of the arguments object (omitted: no arguments)."""
    strict: StrictBool | None = None
    """With "required" / named tool_choice, the arguments are constrained to `parameters`: exactly
    (true; a 400 names what cannot be enforced) or best effort (false / absent). "auto" parses calls
    from free text and constrains nothing."""


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Open):
    name: str
    arguments: str
    """The arguments as a JSON text (OpenAI's shape: a string, not an object)."""


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """Assistant turns: the calls it made (rendered back into the prompt)."""
    tool_call_id: str | None = None
    """Tool turns: which call this content answers."""


def _lone_surrogate(value: object, path: str = "") -> tuple[str, str | None] | None:
    """(path, the key or None for a value) of the first string holding a lone UTF-16 surrogate (JSON
    allows "\\ud800"; no tokenizer or UTF-8 encoder does), object keys included; or None."""
    if isinstance(value, str):
        return (path, None) if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return f"{path}.{key}".lstrip("."), key
        found = _lone_surrogate(item, f"{path}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


def _surrogate_message(path: str, key: str | None) -> str:
    """Names the field; errors.error_body writes the surrogate itself out as its escape."""
    where = f"the key {key!r} of {path[: -len(key) - 1] or 'the body'}" if key is not None else path or "the body"
    return (f"{where} contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not "
            "text; send valid Unicode")


_SURROGATE = re.compile("[\ud800-\udfff]")


class _SamplingRequest(_Open):
    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: object) -> object:
        found = _lone_surrogate(data)
        if found is not None:
            raise bad_request(_surrogate_message(*found), found[0] or None)
        return data

    model: str | None = None
    """The served model name (see GET /v1/models); omitted means the one served model."""
    n: StrictInt | None = Field(None, ge=1, le=128)
    """Choices to generate; they run as n rows of the same batch."""
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=100.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: StrictFloat | None = Field(None, ge=0.0, le=1.0)
    seed: StrictInt | None = Field(None, ge=-INT64, lt=INT64)
    """Same seed, same text; choice i of n uses seed + i."""
    presence_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: StrictFloat | None = Field(None, ge=0.1, le=10.0)
    logit_bias: dict[str, StrictFloat] | None = None
    """Token id (as a string) -> bias in [-100, 100] added to its logit."""
    stop: str | list[str] | None = None
    """Up to 16 strings; generation ends before the first one, which is not returned."""
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool | None = False
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    """An end-user id for the provider's abuse monitoring: ignored here, but a string, as OpenAI requires."""
    response_format: ResponseFormat | None = None
    """{"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}:
    the output is constrained to match: exactly under strict true, best effort otherwise."""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    """Functions the model may call; the calls come back as message.tool_calls."""
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """"auto" (default with tools): calls parsed from the output; "required" / a named function:
    the output is constrained to valid calls; "none": plain text."""
    parallel_tool_calls: StrictBool | None = True
    """With "required": false allows exactly one call."""


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    """Text, texts, token ids, or lists of token ids (one completion group per prompt)."""
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    """Return the sampled token's logprob and this many alternatives per position."""
    echo: StrictBool | None = False
    best_of: StrictInt | None = None
    suffix: str | None = None


def unsupported_fields(req: _Open) -> list[tuple[str, str]]:
    """(field path, reason) for every field that would change behaviour we do not implement."""
    found = _extras(req, "")
    if isinstance(req, ChatCompletionRequest):
        for i, msg in enumerate(req.messages):
            found += _extras(msg, f"messages.{i}.")  # content parts: render.py names non-text types
        for i, tool in enumerate(req.tools or ()):
            found += _extras(tool, f"tools.{i}.") + _extras(tool.function, f"tools.{i}.function.")
    if req.stream_options is not None:
        found += _extras(req.stream_options, "stream_options.")
    if req.response_format is not None:
        found += _extras(req.response_format, "response_format.")
        if req.response_format.json_schema is not None:
            found += _extras(req.response_format.json_schema, "response_format.json_schema.")
    if isinstance(req, CompletionRequest):
        found += _completion_only(req)
    return found


def _extras(model: _Open, prefix: str) -> list[tuple[str, str]]:
    out = []
    for name, value in (model.model_extra or {}).items():
        if name in HARMLESS_FIELDS or value is None:
            continue
        if name in DEPRECATED_FIELDS:
            if value != []:
                out.append((prefix + name, DEPRECATED_FIELDS[name]))
        else:
            out.append((prefix + name, "is not a recognized field"))
    return out


def _completion_only(req: CompletionRequest) -> list[tuple[str, str]]:
    out = []
    if req.echo:
        out.append(("echo", "is not supported (only echo=false)"))
    if req.suffix:
        out.append(("suffix", "is not supported"))
    if req.best_of is not None and req.best_of != (req.n or 1):
        out.append(("best_of", "is not supported (only best_of equal to n)"))
    return out


# ---- responses ----

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")  # "speculative_decoding" when it ran (see mlx_loom/server/output.py)

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class _OmitNoCalls(BaseModel):
    """`tool_calls` is left out, not null, when there are none (as OpenAI answers)."""

    @model_serializer(mode="wrap")
    def _omit_no_calls(self, handler):
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class AssistantMessage(_OmitNoCalls):
    role: Literal["assistant"] = "assistant"
    content: str | None
    """None when the answer is only tool calls."""
    tool_calls: list[ToolCall] | None = None
    """Present only when the model called tools."""


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """First delta of a call: index, id, type, name and arguments ""; later ones: arguments text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatChoice(BaseModel):
    """extra: "validation_error" appears only when a constrained output failed final validation."""

    model_config = ConfigDict(extra="allow")
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(_OmitNoCalls):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    model_config = ConfigDict(extra="allow")  # "validation_error" on the finishing chunk, see ChatChoice
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    """extra: "validation_error" appears only when a constrained output failed final validation."""

    model_config = ConfigDict(extra="allow")
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlx-loom"
    max_model_len: int


class ErrorDetail(BaseModel):
    message: str
    """What went wrong and what to change."""
    type: str
    """"invalid_request_error" for 4xx, "server_error" for 5xx."""
    param: str | None = None
    """The request field at fault (dotted path, e.g. "messages.0.content"), when there is one."""
    code: str | None = None
    """A stable machine-readable reason (e.g. "model_not_found", "context_length_exceeded")."""


class ErrorResponse(BaseModel):
    """The body of every error response (OpenAI's shape); documented in the OpenAPI document."""

    error: ErrorDetail


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
