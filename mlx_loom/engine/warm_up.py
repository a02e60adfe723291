"""Warm-up before ready: run the step shapes the engine will see before /health says 200.

On GPU backends the first call of each kernel shape JIT-compiles (about a minute for a first
request on CUDA); on the CPU the first steps fault in the weights and the BLAS and allocator
working sets. So, after the self-check and before the engine reports ready, one decode step per
batch-size bucket (1, 2, 4, ... up to max_num_seqs), one full prefill chunk and the sampler's
paths (greedy on the device, temperature / top-p with logprobs) run once through the runner the
scheduler drives. Scratch pages only: no request, no prefix-cache entry is left behind, and the
pages written are overwritten by the first requests that own them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import mlx.core as mx

from mlx_loom.sample.sampler import SamplingRow, device_tokens, sample
from mlx_loom.sched.params import SamplingParams
from mlx_loom.sched.scheduler import ScheduledRow
from mlx_loom.worker.runner import ModelRunner

log = logging.getLogger("mlx_loom.engine")

_SAMPLED = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, logprobs=True, top_logprobs=5, seed=0)


@dataclass(frozen=True)
class WarmUpResult:
    seconds: float
    batch_sizes: tuple[int, ...]
    """Decode batch sizes that ran, in order."""
    prefill_tokens: int
    """Length of the prefill chunk that ran (0: none fit)."""


def batch_buckets(max_num_seqs: int, num_blocks: int) -> tuple[int, ...]:
    """Powers of two up to the largest batch, and the largest batch itself (each row needs a page)."""
    top = max(1, min(max_num_seqs, num_blocks))
    sizes = [1 << i for i in range(top.bit_length()) if 1 << i < top]
    return (*sizes, top)


def warm_up(runner: ModelRunner, vocab_size: int, max_num_seqs: int, chunk_tokens: int,
            max_len: int) -> WarmUpResult:
    """Run every bucket's decode step, one prefill chunk and the sampler once; the time it took."""
    start = time.perf_counter()
    bs = runner.block_size
    num_blocks = runner.pools.num_blocks
    token = min(vocab_size - 1, 8)
    sizes = batch_buckets(max_num_seqs, num_blocks)
    for b in sizes:  # decode rows at the last slot of a page each: attention over a full page
        runner.forget_scratch_states()  # every bucket resumes its scratch states at the same position
        rows = [ScheduledRow(f"warm-up-{i}", (token,), bs - 1, (i,), True, state_slot=i) for i in range(b)]
        logits, _ = runner.execute(rows)  # [B, V]
        mx.eval(device_tokens(logits), runner.pool_arrays())
    n = min(chunk_tokens, max_len - 1, num_blocks * bs)
    n = n if n > 1 else 0
    if n:
        chunk = ScheduledRow("warm-up-prefill", (token,) * n, 0, tuple(range(-(-n // bs))), True, state_slot=0)
        logits, _ = runner.execute([chunk])  # [1, V]
        row = SamplingRow(_SAMPLED, chunk.token_ids, (), seed=0)
        sample(mx.concatenate([logits, logits]), [row, SamplingRow(SamplingParams(temperature=0), (), (), 0)])
        mx.eval(runner.pool_arrays())
    result = WarmUpResult(time.perf_counter() - start, sizes, n)
    log.info("warm-up: decode batches %s and a %d-token prefill chunk in %.2f s", ",".join(map(str, sizes)),
             result.prefill_tokens, result.seconds)
    return result
