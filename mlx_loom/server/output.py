"""Per-request output collection: engine deltas -> text deltas per choice.

Each choice (one engine request) is detokenized incrementally and run through its stop
matcher; the choices of one HTTP request are merged into one stream of ChoiceEvents. The
streaming and non-streaming routes consume the same stream, so their text is identical.
Leaving the stream early (client gone, stop string hit) aborts the engine requests.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Sequence

from mlx_loom.engine.client import EngineDeadError, RequestRejected
from mlx_loom.engine.messages import RequestOutput, TokenLogprob
from mlx_loom.sched.params import SamplingParams
from mlx_loom.models.tokenizer import IncrementalDetokenizer
from mlx_loom.server.stop import StopMatcher


class Engine(Protocol):
    """The part of mlx_loom.engine.client.EngineClient the routes use."""

    def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]: ...


class ChoiceObserver(Protocol):
    """Sees one choice's engine outputs as they arrive, then how it ended (mlx_loom/server/metrics.py)."""

    def output(self, out: RequestOutput) -> None: ...

    def end(self, finish_reason: str | None) -> None: ...


class Observer(Protocol):
    def choice(self) -> ChoiceObserver:
        """A fresh observer for one choice, created just before it is submitted."""


class _Unobserved:
    def output(self, out: RequestOutput) -> None:
        pass

    def end(self, finish_reason: str | None) -> None:
        pass


_UNOBSERVED = _Unobserved()


@dataclass(frozen=True)
class ChoiceSpec:
    index: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    request_id: str


@dataclass(frozen=True)
class ChoiceEvent:
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    spec_proposed: int = 0  # speculative decoding, cumulative for the choice
    spec_accepted: int = 0


async def choice_events(engine: Engine, tokenizer, spec: ChoiceSpec, stops: Sequence[str],
                        observer: ChoiceObserver | None = None) -> AsyncIterator[ChoiceEvent]:
    """One choice: detokenize, apply stop strings; a stop string hit ends (and aborts) it."""
    observer = observer or _UNOBSERVED
    detok = IncrementalDetokenizer(tokenizer)
    matcher = StopMatcher(stops) if stops else None
    end: str | None = "abort"  # left before finishing: client gone, or a sibling choice failed
    try:
        async with aclosing(engine.generate(spec.prompt_ids, spec.params, spec.request_id)) as outputs:
            async for out in outputs:
                observer.output(out)
                if out.finish_reason == "abort":
                    raise EngineDeadError(out.error or "request aborted by the engine")
                text = detok.feed(list(out.new_token_ids)) + (detok.flush() if out.finished else "")
                finish = out.finish_reason
                if matcher is not None:
                    text = matcher.feed(text) + (matcher.flush() if out.finished else "")
                    finish = "stop" if matcher.stopped else finish
                end = finish or end
                yield ChoiceEvent(spec.index, text, out.new_token_ids, out.logprobs or (), finish,
                                  out.num_prompt_tokens, out.num_cached_tokens, out.spec_proposed, out.spec_accepted)
                if finish is not None:
                    return  # closing `outputs` aborts the engine request if it is still running
    except RequestRejected:
        end = None  # refused at admission (a 400): never served
        raise
    except Exception:
        end = "error"
        raise
    finally:
        observer.end(end)


_DONE = object()


async def merged_events(engine: Engine, tokenizer, specs: Sequence[ChoiceSpec], stops: Sequence[str],
                        observer: Observer | None = None) -> AsyncIterator[ChoiceEvent]:
    """Events of every choice, in arrival order; the first error ends the whole request."""
    if len(specs) == 1:  # one choice (the usual request): no pump task and no queue hop per token
        tracker = observer.choice() if observer is not None else None
        async with aclosing(choice_events(engine, tokenizer, specs[0], stops, tracker)) as events:
            async for event in events:
                yield event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(spec: ChoiceSpec) -> None:
        try:
            tracker = observer.choice() if observer is not None else None
            async for event in choice_events(engine, tokenizer, spec, stops, tracker):
                queue.put_nowait(event)
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(pump(spec)) for spec in specs]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        # Cancelling a pump closes its engine stream, which aborts the engine request.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ChoiceResult:
    """Everything one choice produced, for the non-streaming response."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    spec_proposed: int = 0
    spec_accepted: int = 0


class Collector:
    """Accumulates ChoiceEvents; also the usage bookkeeping of the streaming routes."""

    def __init__(self, specs: Sequence[ChoiceSpec], choices_per_prompt: int) -> None:
        self.results = {s.index: ChoiceResult() for s in specs}
        self.prompt_lens = {s.index: len(s.prompt_ids) for s in specs}
        self.per_prompt = choices_per_prompt

    def add(self, event: ChoiceEvent) -> None:
        r = self.results[event.index]
        r.text.append(event.text)
        r.num_tokens += len(event.token_ids)
        r.logprobs.extend(event.logprobs)
        r.finish_reason = event.finish_reason or r.finish_reason
        r.num_cached_tokens = event.num_cached_tokens or r.num_cached_tokens
        r.spec_proposed = max(r.spec_proposed, event.spec_proposed)
        r.spec_accepted = max(r.spec_accepted, event.spec_accepted)

    def text(self, index: int) -> str:
        """The text of choice `index` so far."""
        return "".join(self.results[index].text)

    def usage(self) -> dict:
        """Prompt tokens count once per prompt (not per choice), as OpenAI counts them."""
        firsts = [i for i in self.results if i % self.per_prompt == 0]
        prompt = sum(self.prompt_lens[i] for i in firsts)
        cached = sum(self.results[i].num_cached_tokens for i in firsts)
        completion = sum(r.num_tokens for r in self.results.values())
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        proposed = sum(r.spec_proposed for r in self.results.values())
        if proposed:  # extension field, only when speculative decoding ran for this request
            accepted = sum(r.spec_accepted for r in self.results.values())
            usage["speculative_decoding"] = {"draft_tokens": proposed, "accepted_tokens": accepted,
                                             "acceptance_rate": round(accepted / proposed, 4)}
        return usage
