"""Speculative decoding in the engine (issue 7): throughput with and without, and acceptance.

Configurations, same default model, same chat prompts, greedy, exactly --new-tokens each:
  plain       speculation off
  auto        --speculative mxfp4 --spec-k 4, mode auto: the controller measures costs at start-up
              and speculates only where it predicts >= 1.05x (on MLX's CPU backend: never)
  always-l1   mxfp4 draft, k=4, every eligible step (shows the acceptance and what it costs here)
  always-l2   the same with n-gram lookup drafting for the MXFP4 draft (two levels)
  always-nvfp4  an NVFP4 self-draft (group 16), k=4, every eligible step
Reports tok/s (median of --repeats after a warm-up), ratio to plain, tokens per target forward
for speculative rows (1 + accepted / verified rows), per-level acceptance, the controller's
measured costs and modelled speedup. Writes benchmarks/results/bench_speculative.{json,md}.

    .venv/bin/python benchmarks/bench_speculative.py --batch 1 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cache_note, chat_prompts, machine, median, run_batch, write_results  # noqa: E402

CONFIGS = {
    "plain": None,
    "auto": dict(method="mxfp4", k=4, mode="auto"),
    "always-l1": dict(method="mxfp4", k=4, mode="always"),
    "always-l2": dict(method="mxfp4", k=4, level2="ngram", mode="always"),
    "always-nvfp4": dict(method="nvfp4", k=4, mode="always"),
}


def measure(loaded, name: str, n: int, args) -> dict:
    from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig, SpecConfig
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.sched.params import SamplingParams

    spec = SpecConfig(**CONFIGS[name]) if CONFIGS[name] else SpecConfig()
    cfg = EngineConfig(cache=CacheConfig(num_blocks=64 + n * 16), spec=spec,
                       scheduler=SchedulerConfig(max_num_seqs=max(n, 1), max_num_batched_tokens=max(512, n)))
    core = EngineCore(cfg, loaded)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    run_batch(core, chat_prompts(loaded.tokenizer, n, 0), params, "warm")
    before = core.stats()
    # New prompts every run (same for every config): no run reuses another's prefix-cache blocks.
    timed = [run_batch(core, chat_prompts(loaded.tokenizer, n, r), params, f"run{r}")
             for r in range(1, args.repeats + 1)]
    after = core.stats()
    times = [b.seconds for b in timed]
    res = {"config": name, "batch": n, "times_s": times, "tok_per_s": n * args.new_tokens / median(times),
           **cache_note(timed)}
    if core.spec is not None:
        drafts = after.spec_num_drafts - before.spec_num_drafts
        prop = [a - b for a, b in zip(after.spec_proposed, before.spec_proposed)]
        acc = [a - b for a, b in zip(after.spec_accepted, before.spec_accepted)]
        ctl = core.spec.controller
        res.update(verified_rows=drafts, proposed=prop, accepted=acc,
                   acceptance=[a / p if p else None for a, p in zip(acc, prop)],
                   tokens_per_target_forward=1 + acc[0] / drafts if drafts else None,
                   modelled_speedup=ctl.last_speedup,
                   costs=str(ctl.costs) if ctl.costs else None)
    print(f"{name:10s} N={n:<3d} {res['tok_per_s']:7.1f} tok/s  "
          f"{'tokens/target fwd %.2f' % res['tokens_per_target_forward'] if res.get('tokens_per_target_forward') else ''}",
          flush=True)
    return res


def report(rows: list[dict], args) -> str:
    plain = {r["batch"]: r["tok_per_s"] for r in rows if r["config"] == "plain"}
    lines = [
        "# bench_speculative: speculative decoding in the engine (ML-SpecQD, MXFP4 self-draft)",
        "",
        f"Default SmolLM2-135M-Instruct (GGUF Q4_1, native 4-bit path), {args.new_tokens} greedy tokens per "
        f"request (EOS ignored), varied chat prompts new in every run (shared: template and system prompt; "
        f"prefix caching on), median of {args.repeats} runs after a warm-up. "
        "auto = the controller decides from costs measured at start-up; always = every eligible step, k=4.",
        "",
        "| config | N | tok/s | vs plain | tokens per target forward | acceptance per level | modelled speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tok_per_s"] / plain[r["batch"]] if r["batch"] in plain else None
        tpf = r.get("tokens_per_target_forward")
        acc = ", ".join(f"L{i + 1} {a:.2f}" for i, a in enumerate(r.get("acceptance") or []) if a is not None)
        ms = r.get("modelled_speedup")
        lines.append(f"| {r['config']} | {r['batch']} | {r['tok_per_s']:.1f} | "
                     f"{f'{ratio:.2f}x' if ratio else '-'} | {f'{tpf:.2f}' if tpf else '-'} | {acc or '-'} | "
                     f"{f'{ms:.2f}' if ms else '-'} |")
    costs = next((r["costs"] for r in rows if r.get("costs")), None)
    if costs:
        lines += ["", f"Controller costs measured at start-up (seconds; fixed + per_token x n): `{costs}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", default="bench_speculative")
    args = ap.parse_args()

    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.models.loader import describe_backend, load_model

    loaded = load_model(None)
    rows = [measure(loaded, c, n, args) for n in args.batch for c in args.configs]
    md = report(rows, args) + f"\nBackend: {describe_backend()}\n"
    payload = {"machine": machine(), "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows}
    js, mdp = write_results(args.out, payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
