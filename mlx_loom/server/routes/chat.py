"""POST /v1/chat/completions"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import replace
from typing import AsyncIterator

from fastapi import APIRouter, Request, Response

from mlx_loom.server.admission import AdmissionSlot
from mlx_loom.server.logprobs import chat_logprobs
from mlx_loom.server.metrics import metrics_of
from mlx_loom.server.openapi import GENERATION_ERRORS, STREAM_OK, error_responses
from mlx_loom.server.output import ChoiceEvent, Collector, merged_events
from mlx_loom.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                             ChatCompletionRequest, ChatCompletionResponse, ChatDelta, ChatLogprobs, FunctionCall,
                             FunctionCallDelta, ToolCall, ToolCallDelta, Usage)
from mlx_loom.server.render import render_chat
from mlx_loom.server.routes.common import (Job, collect, engine_errors, make_job, new_id, plan_choices,
                                  reject_unsupported, stream_error)
from mlx_loom.server.sampling import base_params, check_prompt, limits_of, resolve_max_tokens, stop_strings
from mlx_loom.server.sse import DONE, EventStream, event, unless_disconnected
from mlx_loom.server.state import get_state
from mlx_loom.server.structured import compile_grammar, grammar_spec, schema_headers
from mlx_loom.server.tool_parsers import Delta, ToolParser, make_parser, merge
from mlx_loom.server.tools import tool_call_format, tool_plan

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             summary="Chat completion (stream: true answers with server-sent events)",
             responses={**STREAM_OK, **error_responses(*GENERATION_ERRORS)})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, response: Response,
                                slot: AdmissionSlot):
    state = get_state(request)
    reject_unsupported(body)
    info = state.require_ready()
    model = state.check_model(body.model)
    stops = stop_strings(body.stop)
    plan = tool_plan(body)
    if plan is not None:
        plan = replace(plan, call_format=tool_call_format(info.tokenizer))
    spec = plan.grammar_spec() if plan is not None else grammar_spec(body.response_format)
    limits = limits_of(info)
    prompt = await render_chat(info.tokenizer, body.messages, plan)
    check_prompt(prompt, limits, "messages")
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(body.max_completion_tokens or body.max_tokens, None, len(prompt), limits, param)
    kwargs = base_params(body, max_tokens, limits)
    grammar = kwargs["grammar"] = await compile_grammar(info, spec, "tools" if plan is not None else None)
    job_id, n = new_id("chatcmpl"), body.n or 1
    job = make_job(job_id, model, plan_choices(job_id, [prompt], kwargs, body.seed, n), n, stops,
                   info.tokenizer, body.stream_options, grammar, plan)
    events = slot.admit(len(job.specs), merged_events(state.client, info.tokenizer, job.specs, stops,
                                                      metrics_of(request)))
    response.headers.update(schema_headers(grammar))
    if body.stream:
        stream = EventStream(_stream(job, events, bool(body.logprobs)))
        stream.headers.update(schema_headers(grammar))
        return stream
    with engine_errors():
        collector = await unless_disconnected(request, collect(events, job.collector()))
    if collector is None:
        return Response(status_code=499)  # client gone; nobody reads this
    return _response(job, collector, bool(body.logprobs))


def _response(job: Job, collector: Collector, want_logprobs: bool) -> ChatCompletionResponse:
    choices = []
    for i, r in sorted(collector.results.items()):
        text = "".join(r.text)
        message, finish = _message(job, text, r.finish_reason)
        choices.append(ChatChoice(
            index=i, message=message, finish_reason=finish,
            logprobs=ChatLogprobs(**chat_logprobs(r.logprobs, job.text_of)) if want_logprobs else None,
            **job.validation(text, r.finish_reason)))
    return ChatCompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices,
                                  usage=Usage(**collector.usage()))


def _message(job: Job, text: str, finish_reason: str | None) -> tuple[AssistantMessage, str | None]:
    """The assistant message of one choice; tool calls parsed the same way the stream parses them."""
    if job.tools is None:
        return AssistantMessage(content=text), finish_reason
    parser = make_parser(job.tools)
    content, calls = merge(parser.feed(text) + parser.finish())
    tool_calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments="".join(c.arguments)))
                  for c in calls]
    if not tool_calls:
        return AssistantMessage(content=content), finish_reason
    return (AssistantMessage(content=content if content.strip() else None, tool_calls=tool_calls),
            _tool_finish(finish_reason))


def _tool_finish(finish_reason: str | None) -> str | None:
    return "tool_calls" if finish_reason == "stop" else finish_reason


def _chunk(job: Job, choices: list[ChatChunkChoice], usage: dict | None = None) -> bytes:
    return event(ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=choices,
                                     usage=Usage(**usage) if usage else None))


async def _stream(job: Job, events: AsyncIterator[ChoiceEvent], want_logprobs: bool) -> AsyncIterator[bytes]:
    collector = job.collector()
    parsers = {spec.index: make_parser(job.tools) for spec in job.specs} if job.tools is not None else {}
    async with aclosing(events):
        try:
            for spec in job.specs:
                yield _chunk(job, [ChatChunkChoice(index=spec.index, delta=ChatDelta(role="assistant", content=""))])
            async for ev in events:
                collector.add(ev)
                for choice in _chunk_choices(job, ev, want_logprobs, collector, parsers.get(ev.index)):
                    yield _chunk(job, [choice])
            if job.include_usage:
                yield _chunk(job, [], collector.usage())
        except Exception as exc:
            yield stream_error(exc)
    yield DONE


def _chunk_choices(job: Job, ev: ChoiceEvent, want_logprobs: bool, collector: Collector,
                   parser: ToolParser | None) -> list[ChatChunkChoice]:
    out = []
    logprobs = ChatLogprobs(**chat_logprobs(ev.logprobs, job.text_of)) if want_logprobs and ev.logprobs else None
    deltas = [ChatDelta(content=ev.text)] if ev.text else []
    if parser is not None:
        parsed = parser.feed(ev.text) + (parser.finish() if ev.finish_reason is not None else [])
        deltas = [_chat_delta(d) for d in parsed]
    if logprobs is not None and not deltas:
        deltas = [ChatDelta()]
    for i, delta in enumerate(deltas):
        out.append(ChatChunkChoice(index=ev.index, delta=delta, logprobs=logprobs if i == 0 else None))
    if ev.finish_reason is not None:
        finish = _tool_finish(ev.finish_reason) if parser is not None and parser.num_calls else ev.finish_reason
        extra = job.validation(collector.text(ev.index), ev.finish_reason)
        out.append(ChatChunkChoice(index=ev.index, delta=ChatDelta(), finish_reason=finish, **extra))
    return out


def _chat_delta(d: Delta) -> ChatDelta:
    calls = [ToolCallDelta(index=c.index, id=c.id, type="function" if c.id else None,
                           function=FunctionCallDelta(name=c.name, arguments=c.arguments)) for c in d.calls]
    return ChatDelta(content=d.content or None, tool_calls=calls or None)
