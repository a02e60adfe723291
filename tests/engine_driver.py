"""Drive an EngineCore step by step in tests: requests join at chosen steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig
from mlx_loom.engine.core import EngineCore
from mlx_loom.engine.messages import AddRequest, RequestOutput
from mlx_loom.sched.params import SamplingParams


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached: int = 0
    error: str | None = None
    logprobs: list = field(default_factory=list)


def make_core(loaded, num_blocks: int = 512, max_num_seqs: int = 32, budget: int = 256,
              prefix_caching: bool = True) -> EngineCore:
    cfg = EngineConfig(
        cache=CacheConfig(block_size=16, num_blocks=num_blocks, enable_prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
    )
    return EngineCore(cfg, loaded)


def run(core: EngineCore, requests: list[tuple[str, list[int], SamplingParams]],
        join_step: dict[str, int] | None = None, max_steps: int = 5000) -> dict[str, Result]:
    """Run until every request finishes; request i joins at join_step[id] (default 0)."""
    join_step = join_step or {}
    results = {rid: Result() for rid, _, _ in requests}
    pending = list(requests)
    for step in range(max_steps):
        for item in [r for r in pending if join_step.get(r[0], 0) <= step]:
            pending.remove(item)
            out = core.add(AddRequest(item[0], tuple(item[1]), item[2]))
            if out is not None:
                _collect(results, out)
        if not pending and not core.has_unfinished():
            return results
        for out in core.step():
            _collect(results, out)
    raise AssertionError("engine did not finish")


def _collect(results: dict[str, Result], out: RequestOutput) -> None:
    r = results[out.request_id]
    r.tokens.extend(out.new_token_ids)
    if out.logprobs:
        r.logprobs.extend(out.logprobs)
    if out.finished:
        r.finish_reason, r.cached, r.error = out.finish_reason, out.num_cached_tokens, out.error


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
