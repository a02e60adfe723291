"""The program each rank runs in the multi-rank engine tests (`mlx.launch -n 2 tests/dist_driver.py ...`).

Rank 0 drives an EngineCore over the group exactly as tests/engine_driver.py does in one process
(requests joining at chosen steps) and writes the tokens as JSON; the other ranks follow. Run
without a launcher it is the one-process reference.

argv: out.json then mode:model_dir pairs (one EngineCore per model, one after the other, in one launch);
a mode written `tensor+crowd` / `pipeline+crowd` also runs the preemption crowd (CROWD) on that model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_driver import run  # noqa: E402

from mlx_loom.engine.core import EngineCore  # noqa: E402
from mlx_loom.engine.follower import run_follower  # noqa: E402
from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from mlx_loom.sched.params import SamplingParams  # noqa: E402
from mlx_loom.server.settings import launched_rank  # noqa: E402

PROMPTS = {  # id -> (prompt ids, max tokens, join step)
    "a": ([5, 17, 33, 90, 12, 7, 61, 200, 3, 44, 8, 19], 12, 0),
    "b": ([9, 9, 41, 100, 23, 250, 77], 10, 2),
    "c": ([300, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], 8, 5),
}
SHARED = [(37 * i + 5) % 300 for i in range(40)]  # a prompt whose first 32 tokens a later one repeats
CROWD = {f"q{i}": [(31 * i + 7 * j + 3) % 300 for j in range(20)] for i in range(8)}
"""8 requests of 20 + 170 tokens: 96 pages at their longest, over a pool of 64 (preemption by recompute)."""


def config(model: str, mode: str | None) -> EngineConfig:
    return EngineConfig(model=model, cache=CacheConfig(block_size=16, num_blocks=64),
                        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                        warmup=True, parallel=mode)  # warm-up runs on every rank alike


def main(out: str, *cases: str) -> None:
    results = {}
    for case in cases:
        mode, model = case.split(":", 1)
        mode, _, extra = mode.partition("+")
        cfg = config(model, mode if launched_rank() is not None else None)
        if launched_rank():
            run_follower(cfg)
        else:
            results[case] = serve_case(cfg, crowd=extra == "crowd")
    if not launched_rank():
        Path(out).write_text(json.dumps(results))


def serve_case(cfg: EngineConfig, crowd: bool = False) -> dict:
    core = EngineCore(cfg)
    if cfg.warmup:  # as EngineThread does; the followers warm up in run_follower
        core.warm_up()
    core.begin_serving(lambda reason: print("stalled:", reason, flush=True))
    greedy = {rid: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for rid, (_, n, _) in PROMPTS.items()}
    alone = run(core, [("a", PROMPTS["a"][0], greedy["a"])])
    batched = run(core, [(rid, p, greedy[rid]) for rid, (p, _, _) in PROMPTS.items()],
                  join_step={rid: j for rid, (_, _, j) in PROMPTS.items()})
    prefix = run(core, [("p1", SHARED, greedy["b"])])
    prefix.update(run(core, [("p2", SHARED[:32] + [7, 8, 9], greedy["b"])]))  # two full blocks of p1's
    before = core.stats().num_preemptions
    crowded = run(core, [(rid, p, SamplingParams(temperature=0.0, max_tokens=170, ignore_eos=True))
                         for rid, p in CROWD.items()]) if crowd else {}
    stats = core.stats()
    core.close()
    everything = [*alone.values(), *batched.values(), *prefix.values(), *crowded.values()]
    return {
        "alone": alone["a"].tokens,
        "batched": {rid: r.tokens for rid, r in batched.items()},
        "prefix": {rid: r.tokens for rid, r in prefix.items()},
        "prefix_cached": prefix["p2"].cached,
        "crowd": {rid: r.tokens for rid, r in crowded.items()},
        "preemptions": stats.num_preemptions - before,
        "errors": [r.error for r in everything if r.error],
        "group": stats.group,
        "path": core.runner.path,
    }


if __name__ == "__main__":
    main(*sys.argv[1:])
