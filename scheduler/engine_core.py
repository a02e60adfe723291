"""EngineCore: the step logic of the engine, with no thread of its own.

add / abort / step are called by one thread only (the engine thread in the server, the
caller in tests and benchmarks). Everything MLX happens here or below.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import mlx.core as mx

from scheduler.config import EngineConfig
from scheduler.messages import AddRequest, EngineStats, RequestOutput, TokenLogprob
from scheduler.model import LoadedModel, describe_backend, load_model
from scheduler.request import Request
from scheduler.runner import ModelRunner
from scheduler.sampler import SampledToken, SamplingRow, sample
from scheduler.scheduler import Scheduler, SchedulerOutput
from scheduler.engine import EngineInfo
from scheduler.structured import StructuredOutput

log = logging.getLogger("mlx_loom.engine")


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        cfg = config
        if loaded is None:
            loaded = load_model(cfg.model, dequantize=None if cfg.dequantize_on_cpu else False)
        log.info("backend: %s", describe_backend())
        block_bytes = ModelRunner.kv_bytes_per_block(loaded.model, cfg.cache.block_size, loaded.dtype)
        num_blocks = cfg.cache.num_blocks or max(2, int(cfg.cache.kv_cache_memory_gb * 2**30 // block_bytes))
        max_len = min(cfg.scheduler.max_model_len, loaded.max_model_len)
        self.runner = ModelRunner(loaded.model, num_blocks, cfg.cache.block_size, loaded.dtype)
        self.scheduler = Scheduler(replace(cfg.scheduler, max_model_len=max_len), cfg.cache, num_blocks)
        self.eos = frozenset(loaded.tokenizer.eos_token_ids)
        backend = _grammar_backend(loaded)
        self.structured = StructuredOutput(backend)
        self.info = EngineInfo(loaded.name, max_len, loaded.tokenizer, num_blocks, cfg.cache.block_size, backend)
        self.steps = 0
        self._emitted: dict[str, int] = {}  # request id -> output tokens already reported
        self._pending_logprobs: dict[str, list[TokenLogprob]] = {}
        log.info("KV pool: %d blocks x %d tokens (%.0f MB)", num_blocks, cfg.cache.block_size,
                 num_blocks * block_bytes / 2**20)

    def add(self, msg: AddRequest) -> RequestOutput | None:
        """Queue a request; an error output (and nothing queued) if it can never run."""
        req = Request(msg.request_id, list(msg.prompt_token_ids), msg.params, eos_token_ids=self.eos)
        try:
            if msg.params.grammar is not None:
                self.structured.add(req.request_id, msg.params.grammar)
            self.scheduler.add_request(req)
        except ValueError as exc:
            self.structured.remove(req.request_id)
            return RequestOutput(msg.request_id, (), finish_reason="error", error=str(exc),
                                 num_prompt_tokens=len(msg.prompt_token_ids))
        self._emitted[req.request_id] = 0
        return None

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort_request(request_id)
        self.structured.remove(request_id)
        return self._output(req) if req is not None else None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Schedule, run one batched forward, sample, update; the deltas of this step."""
        out = self.scheduler.schedule()
        if not out.rows:
            return []
        sampled = self._run(out)
        self.steps += 1
        for rid, tok in sampled.items():
            if tok.logprob is not None:
                self._pending_logprobs.setdefault(rid, []).append(
                    TokenLogprob(tok.token_id, tok.logprob, tok.top_logprobs))
        tokens = {rid: t.token_id for rid, t in sampled.items()}
        reqs = self.scheduler.requests
        advance = self.structured.advance(tokens, {rid: reqs[rid].is_stop_token(t) for rid, t in tokens.items()})
        changed = self.scheduler.update_from_output(out, tokens, advance.stop_after)
        outputs = [self._output(req) for req in changed]
        for rid, message in advance.errors.items():
            outputs.extend(self._fail(rid, message))
        for req in changed:
            if req.is_finished:
                self.structured.remove(req.request_id)
        return outputs

    def _fail(self, request_id: str, message: str) -> list[RequestOutput]:
        req = self.scheduler.abort_request(request_id)
        self.structured.remove(request_id)
        if req is None:
            return []
        return [RequestOutput(request_id, (), finish_reason="error", error=message,
                              num_prompt_tokens=req.num_prompt_tokens)]

    def _run(self, out: SchedulerOutput) -> dict[str, SampledToken]:
        logits, sample_rows = self.runner.execute(out.rows)  # [S, V]
        if not sample_rows:  # only mid-prompt chunks: just materialize their KV writes
            mx.eval(self.runner.k_pools, self.runner.v_pools)
            return {}
        reqs = [self.scheduler.requests[out.rows[i].request_id] for i in sample_rows]
        logits = self.structured.apply_masks(logits, [r.request_id for r in reqs])
        rows = [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.sample_seed) for r in reqs]
        return {r.request_id: t for r, t in zip(reqs, sample(logits, rows))}

    def _output(self, req: Request) -> RequestOutput:
        """Delta since the last output of this request (tokens and their logprobs)."""
        sent = self._emitted.get(req.request_id, 0)
        new = tuple(req.output_token_ids[sent:])
        self._emitted[req.request_id] = sent + len(new)
        pending = self._pending_logprobs.pop(req.request_id, None)
        if req.is_finished:
            self._emitted.pop(req.request_id, None)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new,
            logprobs=tuple(pending[: len(new)]) if pending is not None else None,
            finish_reason=req.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            error=req.error,
        )

    def fail_all(self, message: str, reason: str = "error") -> list[RequestOutput]:
        outputs = []
        for rid in list(self.scheduler.requests):
            req = self.scheduler.abort_request(rid)
            self.structured.remove(rid)
            if req is not None:
                outputs.append(RequestOutput(rid, (), finish_reason=reason, error=message,
                                             num_prompt_tokens=req.num_prompt_tokens))
        return outputs

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_blocks_total=s.num_blocks,
            num_blocks_free=s.num_free_blocks,
            num_preemptions=s.num_preemptions,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            steps=self.steps,
        )


def _grammar_backend(loaded: LoadedModel):
    """The structured-output backend for this tokenizer, or None (then constrained requests get a 400)."""
    try:
        from schemas.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(loaded.tokenizer, vocab_size=loaded.vocab_size)
    except Exception as exc:  # an unsupported tokenizer must not stop free-text serving
        log.warning("structured output disabled: %s", exc)
        return None
