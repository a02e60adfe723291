"""EngineCore: the step logic of the engine, with no thread of its own.

add / abort / step are called by one thread only (the engine thread in the server, the
caller in tests and benchmarks). Everything MLX happens here or below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Callable

import mlx.core as mx
import numpy as np

from mlx_loom.dist.group import HEARTBEAT_S, open_group
from mlx_loom.engine.info import EngineInfo
from mlx_loom.engine.messages import (
    AddRequest,
    EngineStats,
    RequestOutput,
    TokenLogprob,
)
from mlx_loom.engine.pipeline import next_decode_step, rows_sample_on_device
from mlx_loom.engine.sizing import (
    default_num_blocks,
    grammar_backend,
    hybrid_config,
    num_state_slots,
    num_state_snapshots,
    sparse_config,
)
from mlx_loom.engine.warm_up import WarmUpResult, warm_up
from mlx_loom.models.layout import UnsupportedModelError
from mlx_loom.models.loader import LoadedModel, describe_backend, load_model
from mlx_loom.sample.sampler import (
    DeviceSample,
    SampledToken,
    SamplingRow,
    read,
    sample,
    sample_on_device,
)
from mlx_loom.sample.structured import StructuredOutput
from mlx_loom.sched.config import EngineConfig
from mlx_loom.sched.request import Request
from mlx_loom.sched.scheduler import Scheduler, SchedulerOutput
from mlx_loom.worker.runner import ModelRunner
from mlx_loom.worker.self_check import check_or_unbatch

log = logging.getLogger("mlx_loom.engine")


@dataclass(frozen=True)
class _InFlight:
    """A launched decode step: its rows and its draws (tokens [B] int32, logprobs), still on the device."""

    out: SchedulerOutput
    drawn: DeviceSample


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        cfg = config
        self.group = open_group(cfg) if cfg.parallel is not None and loaded is None else None
        """This process's place in a multi-rank group (mlx_loom/dist/), or None: one process."""
        if self.group is not None:
            loaded = self.group.model.loaded
        elif loaded is None:
            loaded = load_model(cfg.model, dequantize=None if cfg.dequantize_on_cpu else False)
        backend_text = describe_backend()
        log.info("backend: %s", backend_text)
        block_bytes = ModelRunner.kv_bytes_per_block(loaded.model, cfg.cache.block_size, loaded.dtype)
        max_len = min(cfg.scheduler.max_model_len, loaded.max_model_len)
        num_blocks = cfg.cache.num_blocks or default_num_blocks(cfg, block_bytes, max_len)
        slot_bytes = ModelRunner.state_bytes_per_slot(loaded.model)
        num_slots = num_state_slots(cfg, slot_bytes)
        num_snapshots = 0
        if num_slots is not None:
            num_snapshots = num_state_snapshots(cfg, slot_bytes, num_blocks)
            cfg = hybrid_config(cfg, loaded, num_snapshots)
        dense_gb = cfg.cache.dense_decode_kv_gb
        dense_bytes = None if dense_gb is None else int(dense_gb * 2**30)
        if self.group is not None:  # every rank builds the same pools over its own heads / layers
            if num_slots is not None:
                raise UnsupportedModelError(
                    "models with recurrent state (hybrids) are served in one process only, not over a group")
            num_blocks = self.group.model.num_blocks
            self.runner = self.group.make_runner(num_blocks, cfg.cache.block_size, loaded.dtype, dense_bytes)
        else:
            self.runner = ModelRunner(loaded.model, num_blocks, cfg.cache.block_size, loaded.dtype,
                                      sparse=sparse_config(cfg.sparse_prefill, loaded), dense_decode_bytes=dense_bytes,
                                      num_state_slots=num_slots or 0, num_state_snapshots=num_snapshots)
        check = check_or_unbatch(self.runner, loaded.model, loaded.vocab_size, loaded.dtype)
        self.runner.discard_derived()  # the check's rows are not requests
        self.runner.forget_scratch_states()
        log.info("forward: %s; self-check max relative logit error %.2g over %d positions (tolerance %g)",
                 self.runner.path, check.max_error, check.positions, check.tolerance)
        backend_text = f"{backend_text}; forward: {self.runner.path}"
        self.scheduler = Scheduler(replace(cfg.scheduler, max_model_len=max_len), cfg.cache, num_blocks, num_slots,
                                   num_snapshots)
        self.spec = None
        if cfg.spec.method is not None:
            from mlx_loom.spec.draft_model import DRAFT_KINDS
            from mlx_loom.spec.speculator import build_speculator

            if self.runner.generic is not None and {cfg.spec.method, cfg.spec.level2} & set(DRAFT_KINDS):
                raise ValueError(f"speculative self-drafts ({', '.join(DRAFT_KINDS)}) are built from llama layers; "
                                 f"this model runs its own code ({self.runner.generic_reason}): use a draft model")

            self.spec = build_speculator(cfg.spec, loaded, self.runner, num_blocks, cfg.cache.block_size, max_len)
            log.info("speculative decoding: %s, k=%d, level 2 %s, mode %s (costs %s)", cfg.spec.method,
                     cfg.spec.k, cfg.spec.level2, cfg.spec.mode, self.spec.controller.costs)
        self.eos = frozenset(loaded.tokenizer.eos_token_ids)
        backend = grammar_backend(loaded)
        self.structured = StructuredOutput(backend)
        self.info = EngineInfo(loaded.name, max_len, loaded.tokenizer, num_blocks, cfg.cache.block_size, backend,
                               backend_text)
        self._config, self._vocab_size = cfg, loaded.vocab_size
        self.steps = 0
        self.async_decode = cfg.async_decode and self.group is None  # a group sends token ids, not device arrays
        self._inflight: _InFlight | None = None  # a launched step whose tokens are not read yet
        self.pipelined_steps = 0
        self.dropped_steps = 0  # launched steps dropped unapplied (`_drop_inflight`)
        self._updating = False  # set once a step starts changing request state
        self._emitted: dict[str, int] = {}  # request id -> output tokens already reported
        self._pending_logprobs: dict[str, list[TokenLogprob]] = {}
        log.info("KV pool: %d blocks x %d tokens (%.0f MB)", num_blocks, cfg.cache.block_size,
                 num_blocks * block_bytes / 2**20)
        if num_slots is not None:
            log.info("state pool: %d slots and %d prefix snapshots x %.1f MB (recurrent state of the hybrid's "
                     "own cache)", num_slots, num_snapshots, slot_bytes / 2**20)

    def warm_up(self) -> WarmUpResult:
        """Run every step shape once before the first request (warm_up.py); recorded in self.info."""
        assert not self.has_unfinished(), "warm up before taking requests"
        sched, sparse = self._config.scheduler, (self.runner.sparse_chunks, self.runner.sparse_tokens)
        slots = self.scheduler.state_slots
        rows = sched.max_num_seqs if slots is None else min(sched.max_num_seqs, slots.num_slots)
        result = warm_up(self.runner, self._vocab_size, rows, sched.max_num_batched_tokens, self.info.max_model_len)
        self.runner.sparse_chunks, self.runner.sparse_tokens = sparse  # counters are for requests
        self.runner.discard_derived()  # nothing of the warm-up's rows is kept for requests
        self.runner.forget_scratch_states()
        self.info = replace(self.info, warmup_seconds=result.seconds)
        return result

    def begin_serving(self, on_group_stall: Callable[[str], None]) -> None:
        """After start-up (load, self-check, warm-up ran on every rank alike): rank 0 of a group sends
        every step from here on, and reports a step past the group timeout through on_group_stall."""
        if self.group is not None:
            self.group.lead(self._config.group_timeout_s, on_group_stall)

    @property
    def idle_tick_s(self) -> float | None:
        """How often idle() wants to run while no request is open (None: never)."""
        return HEARTBEAT_S if self.group is not None else None

    def idle(self) -> None:
        """No request open: a group pings every rank (a rank that died meanwhile fails loudly here)."""
        if self.group is not None:
            self.group.runner.ping()

    def close(self) -> None:
        """Shutting down: every other rank of a group stops too."""
        if self.group is not None:
            self.group.close()

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
                                 num_prompt_tokens=len(msg.prompt_token_ids), blame="request")
        self._emitted[req.request_id] = 0
        return None

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort_request(request_id)
        self._forget(request_id)
        live = self.scheduler.requests
        if self._inflight is not None and not any(r.request_id in live for r in self._inflight.out.rows):
            self._inflight = None  # a launched step for nobody: nothing of it will be read
        return self._output(req) if req is not None else None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Schedule, run one batched forward, sample, update; the deltas of this step.

        Decode-only steps with nobody waiting are pipelined (pipeline.py): the next step
        is launched before this one's tokens are read, so host work overlaps the device. An
        exception past scheduling fails only the requests that cause it: the step's rows are
        retried one by one (while no request state changed yet), and a row that fails alone gets
        an error output; the engine serves on."""
        if self._inflight is not None:
            return self._pipelined_step()
        out = self.scheduler.schedule()
        if not out.rows:
            return []
        if self._pipelined(out):
            try:
                self._inflight = self._launch(out, None)
                return []  # its tokens come with the next call
            except Exception:
                log.exception("launching a pipelined step failed; running it synchronously")
                self._recover(RuntimeError("pipelined launch"))
        return self._guarded(out, retry_alone=len(out.rows) > 1)

    def _pipelined(self, out: SchedulerOutput) -> bool:
        return (self.async_decode and self.spec is None
                and rows_sample_on_device(out, self.scheduler.requests))

    def _launch(self, out: SchedulerOutput, prev: mx.array | None) -> _InFlight:
        """Build the step (from prev [B] int32, the previous step's tokens still on the device, or
        from the rows' known tokens) with its sampling, and start it; nothing is read. Grammar rows
        need their matchers current: never with prev (see `_pipelined_step`)."""
        logits, _ = self.runner.execute(out.rows, prev)  # [B, V]
        return self._launch_sampling(out, logits, prev)

    def _launch_sampling(self, out: SchedulerOutput, logits: mx.array, prev: mx.array | None) -> _InFlight:
        """Masks for the grammar rows (host), then the sampling graph on logits [B, V], started."""
        reqs = [self.scheduler.requests[row.request_id] for row in out.rows]
        logits = self.structured.apply_masks(logits, [r.request_id for r in reqs])
        drawn = sample_on_device(logits, _sampling_rows(reqs), prev)
        mx.async_eval(*drawn.arrays())
        self.pipelined_steps += 1
        return _InFlight(out, drawn)

    def _pipelined_step(self) -> list[RequestOutput]:
        """Launch the step after the one in flight (when it is determined), then read and apply the
        one in flight while the new one runs. With grammar rows only the next forward is launched
        before the read; its masks are filled once the matchers took this step's tokens, while the
        device runs that forward, and its sampling is launched after them."""
        launched, self._inflight = self._inflight, None
        forward = None  # (step, logits) of a launched forward whose sampling waits for masks
        try:
            after = next_decode_step(self.scheduler, launched.out)
            if after is not None and self._has_grammar(after):
                forward = (after, self.runner.execute(after.rows, launched.drawn.tokens)[0])
                mx.async_eval(forward[1])
            elif after is not None:
                self._inflight = self._launch(after, launched.drawn.tokens)
        except Exception:
            log.exception("launching a pipelined step failed; the next step runs synchronously")
            self._inflight = forward = None
        try:
            tokens, redone = read(launched.drawn)
            if redone and (self._inflight is not None or forward is not None):
                forward = None
                self._drop_inflight()
            live = self.scheduler.requests  # rows of requests ended meanwhile are dropped unread
            sampled = {row.request_id: [t] for row, t in zip(launched.out.rows, tokens) if row.request_id in live}
            outputs = self._apply(launched.out, sampled)
        except Exception as exc:
            self._recover(exc)
            return self._fail_step(launched.out, exc)
        if forward is not None:
            self._sample_forward(*forward)
        return outputs

    def _has_grammar(self, out: SchedulerOutput) -> bool:
        return any(r.request_id in self.structured for r in out.rows)

    def _sample_forward(self, out: SchedulerOutput, logits: mx.array) -> None:
        """Launch the sampling of a forward launched ahead, now that the previous step's tokens are
        applied (so prev is known to the host). If a row's request ended meanwhile the step is
        dropped: it is no longer the next step of the running requests."""
        running = {r.request_id for r in self.scheduler.running}
        if any(row.request_id not in running for row in out.rows):
            self._drop_inflight()
            return
        try:
            self._inflight = self._launch_sampling(out, logits, None)
        except Exception:
            log.exception("launching a pipelined step's sampling failed; the next step runs synchronously")
            self._drop_inflight()

    def _drop_inflight(self) -> None:
        """Forget the launched step: it was launched from a first draw that a redo replaced (a top_p
        nucleus wider than the candidates), or a grammar step's request ended before its sampling.
        It changed no request state; the next synchronous step recomputes its positions and
        overwrites the KV it wrote."""
        self._inflight = None
        self.runner.discard_derived()
        self.dropped_steps += 1

    def _guarded(self, out: SchedulerOutput, retry_alone: bool) -> list[RequestOutput]:
        self._updating = False
        try:
            return self._step(out)
        except Exception as exc:
            self._recover(exc)
            if retry_alone and not self._updating:
                log.warning("step %d failed (%s: %s); retrying its %d rows one by one", self.steps,
                            type(exc).__name__, exc, len(out.rows))
                return [o for row in out.rows for o in self._guarded(self._alone(out, row), False)]
            return self._fail_step(out, exc)

    def _fail_step(self, out: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """Every request of the step gets its error, also one that finished before the failure (its
        final output was never returned)."""
        log.error("step %d failed; failing its %d row(s)", self.steps, len(out.rows), exc_info=exc)
        message = f"the engine failed while running this request ({type(exc).__name__}: {exc})"
        outputs = []
        for rid in dict.fromkeys(r.request_id for r in out.rows):
            req = self.scheduler.requests.get(rid)
            n = req.num_prompt_tokens if req is not None else 0
            outputs.append(self._fail(rid, message, "engine") or RequestOutput(
                rid, (), finish_reason="error", error=message, num_prompt_tokens=n, blame="engine"))
        return outputs

    def _alone(self, out: SchedulerOutput, row) -> SchedulerOutput:
        """The step of one of out's rows; its draft KV is rebuilt (the failed step may have moved it)."""
        if self.spec is not None:
            self.spec.drafter.forget(row.request_id)
        return replace(out, rows=(row,), num_batched_tokens=len(row.token_ids))

    def _recover(self, cause: Exception) -> None:
        """After a failed step: drop state derived from the pools, then check the pools themselves."""
        self.runner.discard_derived()
        _check_pools(self._pools(), cause)

    def _pools(self) -> list[mx.array]:
        """The arrays a step writes: the target's KV (and state) pools and each draft model's."""
        arrays, level = self.runner.pool_arrays(), getattr(self.spec, "drafter", None)
        while level is not None:
            if hasattr(level, "runner"):
                arrays.extend(level.runner.pool_arrays())
            level = getattr(level, "sub", None)
        return arrays

    def _step(self, out: SchedulerOutput) -> list[RequestOutput]:
        if self.spec is not None:
            out = self.spec.extend(out, self.scheduler)
        return self._apply(out, self._run(out))

    def _apply(self, out: SchedulerOutput, sampled: dict[str, list[SampledToken]]) -> list[RequestOutput]:
        """A step's sampled tokens into the requests: grammar, stops, finishes; the outputs."""
        self.steps += 1
        for rid, toks in sampled.items():
            for tok in toks:
                if tok.logprob is not None:
                    self._pending_logprobs.setdefault(rid, []).append(
                        TokenLogprob(tok.token_id, tok.logprob, tok.top_logprobs))
        tokens = {rid: [t.token_id for t in toks] for rid, toks in sampled.items()}
        reqs = self.scheduler.requests
        self._updating = True  # from here on request state changes: a retry would repeat it
        advance = self.structured.advance(tokens, lambda rid, t: reqs[rid].is_stop_token(t))
        changed = self.scheduler.update_from_output(out, advance.kept(tokens), advance.stop_after)
        outputs = [self._output(req) for req in changed]
        for rid, message in advance.errors.items():
            failed = self._fail(rid, message, "request")
            outputs.extend([failed] if failed is not None else [])
        for req in changed:
            if req.is_finished:
                self._forget(req.request_id)
        return outputs

    def _forget(self, request_id: str) -> None:
        self.structured.remove(request_id)
        if self.spec is not None:
            self.spec.forget(request_id)

    def _fail(self, request_id: str, message: str, blame: str) -> RequestOutput | None:
        """End a request with an error (None if it is no longer in the scheduler)."""
        req = self.scheduler.abort_request(request_id)
        self._forget(request_id)
        self._emitted.pop(request_id, None)
        self._pending_logprobs.pop(request_id, None)
        if req is None:
            return None
        return RequestOutput(request_id, (), finish_reason="error", error=message,
                             num_prompt_tokens=req.num_prompt_tokens, blame=blame)

    def _run(self, out: SchedulerOutput) -> dict[str, list[SampledToken]]:
        logits, sample_rows = self.runner.execute(out.rows)  # [S', V]
        if not sample_rows:  # only mid-prompt chunks: just materialize their KV (and state) writes
            mx.eval(self.runner.pool_arrays())
            return {}
        reqs = [self.scheduler.requests[out.rows[i].request_id] for i in sample_rows]
        counts = [out.rows[i].num_draft + 1 for i in sample_rows]
        if max(counts) == 1:
            return self._sample(logits, reqs)
        starts = [0, *accumulate(counts)][:-1]
        plain = [j for j, c in enumerate(counts) if c == 1]
        spec = [j for j, c in enumerate(counts) if c > 1]
        result = self._sample(logits[mx.array([starts[j] for j in plain], dtype=mx.int32)],
                              [reqs[j] for j in plain]) if plain else {}
        # Host copy of the speculative rows' logits only: [sum of their k+1, V].
        rows = mx.array([i for j in spec for i in range(starts[j], starts[j] + counts[j])], dtype=mx.int32)
        x, at = np.array(logits[rows]), 0
        for j in spec:
            result[reqs[j].request_id] = self._verify(reqs[j], x[at : at + counts[j]])
            at += counts[j]
        return result

    def _sample(self, logits: mx.array, reqs: list[Request]) -> dict[str, list[SampledToken]]:
        logits = self.structured.apply_masks(logits, [r.request_id for r in reqs])
        return {r.request_id: [t] for r, t in zip(reqs, sample(logits, _sampling_rows(reqs)))}

    def _verify(self, req: Request, logits: np.ndarray) -> list[SampledToken]:
        """logits [k+1, V] of a speculative row: grammar masks per position, then acceptance."""
        drafts = self.spec.draft_tokens(req.request_id)
        num_valid, logits = self.structured.mask_drafts(req.request_id, drafts, logits)
        return [SampledToken(t, None) for t in self.spec.verify(req, logits, num_valid)]

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
            spec_proposed=req.spec_proposed,
            spec_accepted=req.spec_accepted,
        )

    def fail_all(self, message: str, reason: str = "error") -> list[RequestOutput]:
        self._inflight = None
        outputs = []
        for rid in list(self.scheduler.requests):
            req = self.scheduler.abort_request(rid)
            self._forget(rid)
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
            sparse_prefill_chunks=self.runner.sparse_chunks,
            sparse_prefill_tokens=self.runner.sparse_tokens,
            **(self._spec_stats() if self.spec is not None else {}),
            group=self.group.describe() if self.group is not None else None,
        )

    def _spec_stats(self) -> dict:
        s = self.spec.stats()
        return dict(spec_enabled=True, spec_num_drafts=s.num_drafts, spec_proposed=s.proposed,
                    spec_accepted=s.accepted)


def _sampling_rows(reqs: list[Request]) -> list[SamplingRow]:
    return [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.sample_seed) for r in reqs]


def _check_pools(arrays: list[mx.array], cause: Exception) -> None:
    """After a failed step: the KV (and state) it wrote must still evaluate, else the cache is lost for
    every request and the engine stops loudly. (No copy of the pools is kept to roll back to: holding
    the old arrays would stop MLX from updating them in place, a full pool copy per step.)"""
    try:
        mx.eval(arrays)
    except Exception as exc:
        raise RuntimeError(f"the KV cache cannot be evaluated after a failed step ({cause!r}): {exc}") from exc
