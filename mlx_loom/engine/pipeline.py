"""Which decode steps may be launched before the previous step's tokens are read (pure Python).

Asynchronous stepping: while step t runs on the device, the engine builds and launches step t+1
from t's sampled tokens still on the device, then reads t's tokens and does the host work
(stop checks, detokenization hand-off) while t+1 runs. That is only sound when step t+1 is
known without t's tokens: every running request decodes, none waits to be admitted, and none
can end at t by length (EOS or a stop token still may: then its t+1 token is dropped, never emitted, and its KV
slot is freed with the request). Anything else falls back to one synchronous step. Every
sampling feature (temperature, top-k/p, min-p, seeds, penalties, bias, logprobs) runs on the
device (mlx_loom/sample/sampler.py), with t's tokens counted in t+1's penalties there. A step
with grammar rows launches only its forward ahead: its masks need t's tokens in the matchers,
so they are filled (host) while that forward runs, and its sampling is launched after them.

KV safety: a request that ends while t+1 is in flight frees blocks that t+1 still writes; any
later writer of those blocks runs after it, because every step's KV writes chain through the
same pool arrays (MLX orders them by data dependency).
"""

from __future__ import annotations

from dataclasses import replace
from mlx_loom.sched.request import Request
from mlx_loom.sched.scheduler import Scheduler, SchedulerOutput

PLACEHOLDER = (0,)
"""Token ids of a launched-ahead row: its real input is on the device."""


def rows_sample_on_device(out: SchedulerOutput, requests: dict[str, Request]) -> bool:
    """Whether every row of a step decodes one token sampled on the device (launchable ahead)."""
    for row in out.rows:
        req = requests.get(row.request_id)
        if req is None or len(row.token_ids) != 1 or row.num_draft or not row.sample:
            return False
    return True


def next_decode_step(scheduler: Scheduler, launched: SchedulerOutput) -> SchedulerOutput | None:
    """The step after `launched` (tokens not read yet; its rows passed `rows_sample_on_device`): each
    row one position further, or None when that step is not determined without reading them.
    Allocates the rows' next KV slots."""
    running = scheduler.running
    if scheduler.waiting or len(running) != len(launched.rows):
        return None
    # The same requests as launched, in the same order (the launched tokens feed these rows).
    if [r.request_id for r in running] != [row.request_id for row in launched.rows]:
        return None
    max_len = scheduler.config.max_model_len
    for req in running:
        # The launched step appends one token; this one must not be past max_tokens or the context.
        if len(req.output_token_ids) + 2 > req.params.max_tokens or req.num_tokens + 2 > max_len:
            return None
    rows = []
    for row, req in zip(launched.rows, running):
        block_ids = scheduler.kv.allocate_slots(req, 2)  # the launched position and the next
        if block_ids is None:
            return None  # the pool is short: a synchronous step preempts as usual
        rows.append(replace(row, token_ids=PLACEHOLDER, start_pos=row.start_pos + 1, block_ids=block_ids,
                            restore_from=-1, snapshot_to=-1))  # a hybrid's state copies were the launched row's
    return SchedulerOutput(tuple(rows), len(rows))

