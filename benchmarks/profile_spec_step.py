"""Where a speculative step's time goes (issue 32): the float16 default model, MXFP4 self-draft, N = 1.

Part 1, one forward each (CPU ms, fastest of --repeats, one native thread): a target decode, a target
verification of k+1 tokens of one row, the draft's decode, the 16-bit head alone and the draft's own
head alone. Part 2, the engine generating --new-tokens greedy tokens with `--spec-mode always` (k = 4)
and plain: CPU ms per token split into the speculator's `extend` (all drafting: catch-up, k draft
forwards, host reads) and the target's forwards (verification or decode). The modelled speedup
E(a, k) * decode / (k * draft + verify) with the measured acceptance shows what each part would
have to cost for ML-SpecQD's 1.8x.

    MLX_LOOM_NATIVE_THREADS=1 .venv/bin/python benchmarks/profile_spec_step.py
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import chat_prompts, machine, run_batch, write_results  # noqa: E402


def forward_costs(core, k: int, repeats: int) -> dict:
    """CPU ms of single forwards on scratch blocks (nothing reads what they write)."""
    import mlx.core as mx

    from mlx_loom.sched.scheduler import ScheduledRow

    bs = core.scheduler.kv.block_size
    target, draft = core.runner, core.spec.drafter.runner

    def row(n_tokens: int, pos: int = 64) -> list:
        pages = -(-(pos + n_tokens) // bs)
        return [ScheduledRow("_p", tuple([1] * n_tokens), pos, tuple(range(pages)), sample=True,
                             num_draft=n_tokens - 1)]

    h = mx.zeros((1, target.model.args.hidden_size))
    cases = {
        "target decode (1 token)": lambda: target.execute(row(1))[0],
        f"target verification ({k + 1} tokens)": lambda: target.execute(row(k + 1))[0],
        "draft decode (1 token)": lambda: draft.execute(row(1))[0],
        "target 16-bit head alone": lambda: target._logits(h),
        "draft's own head alone": lambda: draft._logits(h),
    }
    out = {}
    for name, f in cases.items():
        mx.eval(f())
        best = float("inf")
        for _ in range(repeats):
            c = time.process_time()
            mx.eval(f())
            best = min(best, time.process_time() - c)
        out[name] = 1e3 * best
    return out


def engine_split(loaded, mode: str, new_tokens: int) -> dict:
    """CPU ms per token of the engine generating greedily, split into drafting and target forwards."""
    import mlx.core as mx

    from mlx_loom.engine.core import EngineCore
    from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig, SpecConfig
    from mlx_loom.sched.params import SamplingParams

    spec = SpecConfig(method="mxfp4", k=4, mode="always") if mode == "always" else SpecConfig()
    core = EngineCore(EngineConfig(cache=CacheConfig(num_blocks=80), spec=spec,
                                   scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=512)), loaded)
    spent = collections.Counter()

    def timed(obj, name: str, key: str, evaluate: bool = False) -> None:
        inner = getattr(obj, name)

        def call(*a, **kw):
            c = time.process_time()
            r = inner(*a, **kw)
            if evaluate:
                mx.eval(r[0])
            spent[key] += time.process_time() - c
            return r
        setattr(obj, name, call)

    timed(core.runner, "execute", "target forwards", evaluate=True)
    if core.spec is not None:
        timed(core.spec, "extend", "drafting (extend)")
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    run_batch(core, chat_prompts(loaded.tokenizer, 1, 0), params, "warm")
    spent.clear()
    steps0 = core.steps
    c0 = time.process_time()
    for r in (1, 2):
        run_batch(core, chat_prompts(loaded.tokenizer, 1, r), params, f"run{r}")
    total = time.process_time() - c0
    n = 2 * new_tokens
    res = {"total": 1e3 * total / n, **{k: 1e3 * v / n for k, v in spent.items()}}
    res["other"] = res["total"] - sum(1e3 * v / n for v in spent.values())
    res["steps"] = core.steps - steps0
    if core.spec is not None:
        res["forward_costs"] = forward_costs(core, 4, 20)
    return res


def markdown(res: dict) -> str:
    fc = res["always"]["forward_costs"]
    dec = fc["target decode (1 token)"]
    lines = ["# profile_spec_step: where a speculative step's time goes (float16 default model, MXFP4 draft, N = 1)",
             "", "One forward each, CPU ms (fastest of 20, one native thread):", "",
             "| forward | CPU ms | x target decode |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / dec:.2f} |" for k, v in fc.items()]
    lines += ["", f"Engine, greedy, {res['new_tokens']} tokens x 2 runs (CPU ms per token):", "",
              "| mode | total | drafting (extend) | target forwards | other | steps |", "|---|---|---|---|---|---|"]
    for mode in ("plain", "always"):
        r = res[mode]
        lines.append(f"| {mode} | {r['total']:.1f} | {r.get('drafting (extend)', 0):.1f} | "
                     f"{r['target forwards']:.1f} | {r['other']:.1f} | {r['steps']} |")
    a, k = res["acceptance"], 4
    e = (1 - a ** (k + 1)) / (1 - a)
    verify = fc[f"target verification ({k + 1} tokens)"]
    draft = fc["draft decode (1 token)"]
    need = (e * dec / 1.8 - verify) / k
    lines += ["", f"Modelled at per-token acceptance a = {a} (greedy, measured by bench_speculative), k = {k}: "
              f"E = {e:.2f} tokens per step; speedup E x decode / (k x draft + verification) = "
              f"{e * dec / (k * draft + verify):.2f}x. For 1.8x with this verification the draft would have to "
              f"cost {need:.2f} ms ({need / dec:.2f} of a decode; it costs {draft / dec:.2f}); with a free draft the "
              f"ceiling is {e * dec / verify:.2f}x.", "", f"Machine: {res['machine']}; load average at the end "
              f"{res['load'][0]:.1f} / {res['load'][1]:.1f} / {res['load'][2]:.1f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--acceptance", type=float, default=0.9)
    args = ap.parse_args()
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.models.loader import describe_backend, load_model
    from smollm2_checkpoint import checkpoint

    loaded = load_model(str(checkpoint("float16")))
    res = {"new_tokens": args.new_tokens, "acceptance": args.acceptance, "machine": machine(),
           "backend": describe_backend(), "threads": os.environ.get("MLX_LOOM_NATIVE_THREADS")}
    for mode in ("plain", "always"):
        res[mode] = engine_split(loaded, mode, args.new_tokens)
    res["load"] = os.getloadavg()
    md = markdown(res) + f"\nBackend: {res['backend']}\n"
    js, mdp = write_results("profile_spec_step", res, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
