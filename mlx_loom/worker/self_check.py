"""Load-time self-check: the engine's forward must give the model's own logits.

Four short sequences go through the runner the way the scheduler runs them (prefill chunks of
different lengths, a step mixing a chunk with a decode row, batched decode rows at different
positions beside a one-token prompt and a prefix hit, a row alone) and every sampled position is
compared with the model's plain forward (`model(tokens, cache)` over one fresh mlx-lm cache, as its
generation runs) with every module in its own class: the model as mlx-lm's loader builds it, none of
the native kernels the loader routed in (each of those was checked on its own at load, on inputs up
to 4096: mlx_loom/kernels/route_check.py). For
hybrid models this also checks the state slots: a chunked prompt continues its state, decode rows
continue theirs while the one-token prompt starts from zeros in the same call (or in its own, for
models/layout.py `fresh_state_apart` classes), and the prefix hit
resumes from a state snapshot (skipped without snapshots, or with pages larger than the shared
prefix). A fast path that computes something else, or an architecture the generic path gets wrong,
is refused before the server takes a request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_loom.kernels.route_check import own_classes
from mlx_loom.models.layout import prompt_cache
from mlx_loom.models.routing import unroute_model
from mlx_loom.sched.scheduler import ScheduledRow
from mlx_loom.worker.runner import ModelRunner

log = logging.getLogger("mlx_loom.engine")

LENGTHS = (20, 16, 1, 18)  # sequences A, B, a one-token prompt C, and D: A's first 16 tokens + 2
SHARED = 16  # D's prefix shared with A: a prefix hit (A's pages; a hybrid's state snapshot of A at 16)
# (sequence, first position, number of tokens, sampled[, "snapshot" | "restore"]) per row, one tuple of rows per step
STEPS = (
    ((0, 0, 12, False), (1, 0, 13, True)),  # two prefill chunks, only B's sampled
    ((0, 12, 4, False, "snapshot"), (1, 13, 1, True)),  # a chunk next to a decode row; A's state at 16 kept
    ((0, 16, 1, True), (1, 14, 1, True), (2, 0, 1, True), (3, 16, 2, True, "restore")),  # decode rows at
    # different positions, C starts beside them, D resumes from A's prefix
    ((0, 17, 1, True), (1, 15, 1, True)),
    ((0, 18, 1, True),),  # a row alone
    ((0, 19, 1, True),),
)


class ModelCheckError(RuntimeError):
    """The engine's logits differ from the model's own forward: serving would give wrong tokens."""


@dataclass(frozen=True)
class CheckResult:
    max_error: float  # max |engine - plain| / max(1, max |plain|) over every checked position
    tolerance: float
    positions: int


def _tolerance(dtype: mx.Dtype) -> float:
    return 1e-3 if dtype == mx.float32 else 3e-2  # half precision: rounding of K/V and activations


def _sequences(vocab_size: int) -> list[list[int]]:
    """Deterministic, varied token ids (no tokenizer needed; special ids are avoided by skipping the first 8,
    except in vocabularies too small to spare them: every id stays below vocab_size)."""
    skip = 8 if vocab_size > 16 else 0
    span = max(1, min(vocab_size, 4096) - skip)
    seqs = [[skip + (97 * i + 31 * s + 11) % span for i in range(n)] for s, n in enumerate(LENGTHS)]
    seqs[3][:SHARED] = seqs[0][:SHARED]
    return seqs


def _block_tables(block_size: int, with_hit: bool) -> list[tuple[int, ...]]:
    """Each sequence's pages; D's first SHARED // block_size are A's (a prefix hit)."""
    tables, next_id = [], 0
    for s, n in enumerate(LENGTHS):
        shared = tables[0][: SHARED // block_size] if s == 3 and with_hit else ()
        own = -(-n // block_size) - len(shared)
        tables.append((*shared, *range(next_id, next_id + own)))
        next_id += own
    return tables


def _prefix_hit_runs(runner: ModelRunner) -> bool:
    """D's prefix hit needs whole pages of A (block_size <= 16) and, for a hybrid, state snapshots."""
    return runner.block_size <= SHARED and (runner.states is None or runner.states.snapshots is not None)


def _row(seqs: list[list[int]], tables: list[tuple[int, ...]], spec: tuple, hit: bool) -> ScheduledRow:
    s, start, n, sample, *copy = spec
    copy = copy if hit else []
    return ScheduledRow(f"check-{s}", tuple(seqs[s][start : start + n]), start, tables[s], sample, state_slot=s,
                        snapshot_to=0 if copy == ["snapshot"] else -1, restore_from=0 if copy == ["restore"] else -1)


def reference_logits(model: nn.Module, seqs: list[list[int]]) -> list[mx.array]:
    """[L, V] float32 per sequence from the model's plain forward with every module in its own class
    (mlx-lm's MLPs, norms and RoPE, MLX's own quantized layers: none of our kernels). MLX's CPU
    quantized matmul is slow (~1 GFLOP/s), so the result is kept on the model for later engines
    over the same model (tests build many; check_or_unbatch checks twice)."""
    key = tuple(map(tuple, seqs))
    cached = getattr(model, "_loom_reference_logits", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with own_classes(model):  # the reference: mlx-lm's own modules, not the routed ones
        plain = []
        for s in seqs:  # one graph each: a pipeline-parallel model's sends and receives then pair up in
            # the same order on every rank (one graph of several forwards may order them differently); with
            # mlx-lm's own fresh cache, as its generation runs (gemma3n's KV-sharing layers read their source's
            # cache only when there is one: without, they project keys of their own with weights never used)
            plain.append(model(mx.array([s], dtype=mx.int32), cache=prompt_cache(model))[0].astype(mx.float32))
            mx.eval(plain[-1])
    object.__setattr__(model, "_loom_reference_logits", (key, plain))  # not a parameter of the model
    return plain


def check_engine_matches_model(runner: ModelRunner, model: nn.Module, vocab_size: int,
                               dtype: mx.Dtype) -> CheckResult:
    """Raises ModelCheckError when the engine path disagrees with the model's plain forward."""
    runner.forget_scratch_states()  # a second run (one row per call) starts its states over
    seqs = _sequences(vocab_size)
    hit = _prefix_hit_runs(runner)
    tables = _block_tables(runner.block_size, hit)
    needed = len({b for t in tables for b in t})
    if needed > runner.pools.num_blocks:
        raise ModelCheckError(f"the KV pool ({runner.pools.num_blocks} blocks) cannot hold the self-check's "
                              f"{needed} blocks; give the cache more memory")
    plain = reference_logits(model, seqs)
    worst, count = 0.0, 0
    for step in STEPS:
        step = tuple(spec for spec in step if hit or spec[0] != 3)
        logits, sample_rows = runner.execute([_row(seqs, tables, spec, hit) for spec in step])
        for j, i in enumerate(sample_rows):
            s, start, n = step[i][:3]
            expect = plain[s][start + n - 1]
            err = (mx.abs(logits[j] - expect).max() / mx.maximum(mx.abs(expect).max(), 1.0)).item()
            worst, count = max(worst, err), count + 1
        mx.eval(runner.pool_arrays())
    result = CheckResult(worst, _tolerance(dtype), count)
    if not worst <= result.tolerance:  # NaN fails too
        raise ModelCheckError(
            f"self-check failed: the engine's {runner.path} forward gives logits that differ from the model's own "
            f"forward by {worst:.3g} (relative; tolerance {result.tolerance:g}) over {count} positions; refusing "
            "to serve a model that would answer with wrong tokens")
    return result


def check_or_unbatch(runner: ModelRunner, model: nn.Module, vocab_size: int, dtype: mx.Dtype) -> CheckResult:
    """The self-check, with the generic path's fallbacks, each slower and never wrong, taken only when
    the one before fails: one row per call (a model whose own code batches rows wrongly, or raises a
    ValueError on the batch's shapes: gemma2 with three rows), then the model's own modules instead of
    the routed native ones, batched and then one row per call. The reason is logged. Raises the first
    ModelCheckError when none passes (or on the flattened path)."""
    try:
        return check_engine_matches_model(runner, model, vocab_size, dtype)
    except (ModelCheckError, ValueError) as failed:  # ValueError: its code cannot even shape the batch
        if runner.generic is None:
            raise
        first = failed if isinstance(failed, ModelCheckError) else ModelCheckError(
            f"batched rows fail in the model's own code: {failed}")
        unrouted = False
        for rows, unroute in ((1, False), (None, True), (1, True)):
            if unroute and not unrouted:
                unrouted = True
                if not unroute_model(model):
                    break  # nothing was routed: the checks left would repeat the ones that failed
            runner.generic.rows_per_call = rows
            try:
                result = check_engine_matches_model(runner, model, vocab_size, dtype)
            except (ModelCheckError, ValueError):
                continue
            how = ("one row per call" if rows == 1 else "batched rows") + (
                " with the model's own modules, not the routed native ones" if unrouted else "")
            log.warning("the engine's logits differed from the model's own forward (%s); serving %s", first, how)
            return result
        raise first from None
