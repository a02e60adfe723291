"""POST /v1/completions (legacy text completions)"""

from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator

from fastapi import APIRouter, Request, Response

from mlx_loom.server.admission import AdmissionSlot
from mlx_loom.server.logprobs import completion_logprobs
from mlx_loom.server.metrics import metrics_of
from mlx_loom.server.openapi import GENERATION_ERRORS, STREAM_OK, error_responses
from mlx_loom.server.output import ChoiceEvent, Collector, merged_events
from mlx_loom.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage
from mlx_loom.server.render import render_prompts
from mlx_loom.server.routes.common import (Job, collect, engine_errors, make_job, new_id, plan_choices, reject_unsupported,
                                  stream_error)
from mlx_loom.server.sampling import base_params, check_prompt, limits_of, resolve_max_tokens, stop_strings
from mlx_loom.server.sse import DONE, EventStream, event, unless_disconnected
from mlx_loom.server.state import get_state
from mlx_loom.server.structured import compile_grammar, grammar_spec, schema_headers

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


@router.post("/v1/completions", response_model=CompletionResponse,
             summary="Text completion (stream: true answers with server-sent events)",
             responses={**STREAM_OK, **error_responses(*GENERATION_ERRORS)})
async def create_completion(body: CompletionRequest, request: Request, response: Response,
                           slot: AdmissionSlot):
    state = get_state(request)
    reject_unsupported(body)
    info = state.require_ready()
    model = state.check_model(body.model)
    stops = stop_strings(body.stop)
    spec = grammar_spec(body.response_format)
    limits = limits_of(info)
    prompts = await render_prompts(info.tokenizer, body.prompt)
    for prompt in prompts:
        check_prompt(prompt, limits, "prompt")
    longest = max(len(p) for p in prompts)
    max_tokens = resolve_max_tokens(body.max_tokens, DEFAULT_MAX_TOKENS, longest, limits, "max_tokens")
    kwargs = base_params(body, max_tokens, limits)
    grammar = kwargs["grammar"] = await compile_grammar(info, spec)
    job_id, n = new_id("cmpl"), body.n or 1
    job = make_job(job_id, model, plan_choices(job_id, prompts, kwargs, body.seed, n), n, stops,
                   info.tokenizer, body.stream_options, grammar)
    events = slot.admit(len(job.specs), merged_events(state.client, info.tokenizer, job.specs, stops,
                                                      metrics_of(request)))
    want_top = bool(body.logprobs)
    response.headers.update(schema_headers(grammar))
    if body.stream:
        stream = EventStream(_stream(job, events, body.logprobs is not None, want_top))
        stream.headers.update(schema_headers(grammar))
        return stream
    with engine_errors():
        collector = await unless_disconnected(request, collect(events, job.collector()))
    if collector is None:
        return Response(status_code=499)  # client gone; nobody reads this
    return _response(job, collector, body.logprobs is not None, want_top)


def _response(job: Job, collector: Collector, want_logprobs: bool, want_top: bool) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=i,
            text="".join(r.text),
            logprobs=CompletionLogprobs(**completion_logprobs(r.logprobs, job.text_of, want_top))
            if want_logprobs else None,
            finish_reason=r.finish_reason,
            **job.validation("".join(r.text), r.finish_reason),
        )
        for i, r in sorted(collector.results.items())
    ]
    return CompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices,
                              usage=Usage(**collector.usage()))


async def _stream(job: Job, events: AsyncIterator[ChoiceEvent], want_logprobs: bool,
                  want_top: bool) -> AsyncIterator[bytes]:
    collector = job.collector()
    offsets = {spec.index: 0 for spec in job.specs}  # text_offset continues across chunks
    async with aclosing(events):
        try:
            async for ev in events:
                collector.add(ev)
                logprobs = None
                if want_logprobs:
                    logprobs = CompletionLogprobs(**completion_logprobs(ev.logprobs, job.text_of, want_top,
                                                                        offsets[ev.index]))
                    offsets[ev.index] += sum(len(t) for t in logprobs.tokens)
                if ev.text or ev.finish_reason or (logprobs and logprobs.tokens):
                    extra = job.validation(collector.text(ev.index), ev.finish_reason) if ev.finish_reason else {}
                    choice = CompletionChoice(index=ev.index, text=ev.text, logprobs=logprobs,
                                              finish_reason=ev.finish_reason, **extra)
                    yield event(CompletionResponse(id=job.id, created=job.created, model=job.model,
                                                   choices=[choice]))
            if job.include_usage:
                yield event(CompletionResponse(id=job.id, created=job.created, model=job.model, choices=[],
                                               usage=Usage(**collector.usage())))
        except Exception as exc:
            yield stream_error(exc)
    yield DONE
