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

Issue 32 (a 16-bit target, ML-SpecQD's premise): --target float16 / bfloat16 serves the default model
written as a 16-bit mlx-lm directory from the shipped GGUF (benchmarks/smollm2_checkpoint.py). Each
config then runs in its own process (one after the other, same prompts), so each has its own peak
RSS; plain-f32 is the float32 path a 16-bit checkpoint took before (MLX_LOOM_HALF_WEIGHTS=0). Rows
are measured at every --temperatures value (sampled rows seeded); acceptance is also reported by
draft position, and the weight bytes one decode step reads (target and draft).

    .venv/bin/python benchmarks/bench_speculative.py --target float16 --batch 1 8 --temperatures 0 0.7 \
        --configs plain-f32 plain auto --out bench_speculative_f16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cache_note, chat_prompts, machine, median, peak_rss_mb, run_batch, write_results  # noqa: E402

CONFIGS = {
    "plain": None,
    "auto": dict(method="mxfp4", k=4, mode="auto"),
    "always-l1": dict(method="mxfp4", k=4, mode="always"),
    "always-l2": dict(method="mxfp4", k=4, level2="ngram", mode="always"),
    "always-nvfp4": dict(method="nvfp4", k=4, mode="always"),
    "auto-l2": dict(method="mxfp4", k=4, level2="ngram", mode="auto"),
    "plain-f32": None,  # with MLX_LOOM_HALF_WEIGHTS=0: a 16-bit checkpoint widened to float32 at load
}
ENV = {"plain-f32": {"MLX_LOOM_HALF_WEIGHTS": "0"}}


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every projection (packed values, scales, biases)
    and the lm_head (the embedding table when tied); the embedding lookup itself reads one row."""
    import mlx.nn as nn

    tied = getattr(model.args, "tie_word_embeddings", False)
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)) or (tied and isinstance(m, (nn.Embedding,
                                                                                     nn.QuantizedEmbedding))):
            total += sum(m[k].nbytes for k in ("weight", "scales", "biases") if k in m)
    return total


def measure(loaded, name: str, n: int, args, temperature: float = 0.0) -> dict:
    from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig, SpecConfig
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.sched.params import SamplingParams

    spec = SpecConfig(**CONFIGS[name]) if CONFIGS[name] else SpecConfig()
    cfg = EngineConfig(cache=CacheConfig(num_blocks=64 + n * 16), spec=spec,
                       scheduler=SchedulerConfig(max_num_seqs=max(n, 1), max_num_batched_tokens=max(512, n)))
    core = EngineCore(cfg, loaded)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=temperature, ignore_eos=True,
                            **({"seed": 1234} if temperature > 0 else {}))
    run_batch(core, chat_prompts(loaded.tokenizer, n, 0), params, "warm")
    before = core.stats()
    if core.spec is not None:
        from mlx_loom.spec.acceptance import PositionCounts

        core.spec.by_position = {"greedy": PositionCounts(), "sampled": PositionCounts()}
    # New prompts every run (same for every config): no run reuses another's prefix-cache blocks.
    timed, cpu = [], []
    for r in range(1, args.repeats + 1):
        c0 = time.process_time()  # every thread of this process: robust to other processes' load
        timed.append(run_batch(core, chat_prompts(loaded.tokenizer, n, r), params, f"run{r}"))
        cpu.append(time.process_time() - c0)
    after = core.stats()
    times = [b.seconds for b in timed]
    res = {"config": name, "batch": n, "temperature": temperature, "times_s": times,
           "tok_per_s": n * args.new_tokens / median(times), "cpu_s": cpu,
           "cpu_ms_per_token": 1e3 * median(cpu) / (n * args.new_tokens),
           "target_weight_bytes": weight_bytes(loaded.model),
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
                   costs=str(ctl.costs) if ctl.costs else None,
                   draft_weight_bytes=weight_bytes(core.spec.drafter.runner.model),
                   acceptance_by_position={kind: c.rates() for kind, c in core.spec.by_position.items() if c.tried},
                   tried_by_position={kind: c.tried for kind, c in core.spec.by_position.items() if c.tried})
    print(f"{name:10s} N={n:<3d} T={temperature:<4} {res['tok_per_s']:7.1f} tok/s  "
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


def report_16bit(rows: list[dict], args) -> str:
    """Issue 32's table: per (N, temperature), each config against plain on the 16-bit target."""
    plain = {(r["batch"], r["temperature"]): r["tok_per_s"] for r in rows if r["config"] == "plain"}
    plain_cpu = {(r["batch"], r["temperature"]): r["cpu_ms_per_token"] for r in rows if r["config"] == "plain"}
    lines = [
        f"# bench_speculative ({args.target} target): ML-SpecQD on a 16-bit target, MXFP4 self-draft",
        "",
        f"The default SmolLM2-135M-Instruct written as a {args.target} mlx-lm directory from the shipped Q4_1 GGUF "
        f"(benchmarks/smollm2_checkpoint.py). {args.new_tokens} tokens per request (EOS ignored), varied chat "
        f"prompts new in every run, median of {args.repeats} runs after a warm-up; temperature > 0 rows are "
        "seeded. Each config runs in its own process"
        f"{' (all at once: --parallel)' if args.parallel else ' (one after another)'}, so peak RSS is per config; "
        f"{'native and BLAS threads per process: %d; ' % args.threads if args.threads else ''}"
        "CPU ms per token = process CPU time (all threads) / tokens, the measure that holds up when other "
        "processes share the CPUs (tok/s then mostly measures the scheduler's share). "
        "plain-f32 = the float32 path a 16-bit checkpoint took before this change (MLX_LOOM_HALF_WEIGHTS=0). "
        "auto = `--speculative mxfp4 --spec-mode auto` (k <= 4; the controller decides from costs measured "
        "at start-up); always-l1 = MXFP4 draft, k=4, every eligible step.",
        "",
        "| config | N | temperature | tok/s | vs plain | tokens per target forward | acceptance by position "
        "(P(draft i kept given 0..i-1 kept)) | drafts kept / proposed | CPU ms per token | vs plain (CPU) | "
        "peak RSS MB | target / draft weight MB per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = plain.get((r["batch"], r["temperature"]))
        ratio = r["tok_per_s"] / base if base else None
        tpf = r.get("tokens_per_target_forward")
        pos = "; ".join(f"{k}: " + " ".join(f"{a:.2f}" for a in v) for k, v in (r.get("acceptance_by_position") or {}).items())
        kept = (r.get("acceptance") or [None])[0]
        wb = f"{r['target_weight_bytes'] / 1e6:.0f}" + (f" / {r['draft_weight_bytes'] / 1e6:.0f}" if r.get("draft_weight_bytes") else "")
        lines.append(f"| {r['config']} | {r['batch']} | {r['temperature']} | {r['tok_per_s']:.1f} | "
                     f"{f'{ratio:.2f}x' if ratio else '-'} | {f'{tpf:.2f}' if tpf else '-'} | {pos or '-'} | "
                     f"{f'{kept:.2f}' if kept is not None else '-'} | {r['cpu_ms_per_token']:.1f} | "
                     f"{plain_cpu[(r['batch'], r['temperature'])] / r['cpu_ms_per_token']:.2f}x | "
                     f"{r['peak_rss_mb']:.0f} | {wb} |")
    costs = [(r["config"], r["costs"]) for r in rows if r.get("costs")]
    if costs:
        lines += ["", "Controller costs measured at start-up (seconds; fixed + per_token x n):", ""]
        lines += [f"- {c}: `{v}`" for c, v in dict(costs).items()]
    return "\n".join(lines) + "\n"


def child(args) -> None:
    """One config, every (N, temperature): prints one JSON line of rows (peak RSS of this process)."""
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.models.loader import describe_backend, load_model
    from smollm2_checkpoint import checkpoint

    loaded = load_model(str(checkpoint(args.target)) if args.target != "default" else None)
    rows = [measure(loaded, args.configs[0], n, args, t) for n in args.batch for t in args.temperatures]
    for r in rows:
        r["peak_rss_mb"] = peak_rss_mb()
    print("ROWS " + json.dumps({"rows": rows, "backend": describe_backend()}), flush=True)


def parent_16bit(args) -> None:
    from smollm2_checkpoint import checkpoint

    checkpoint(args.target)  # written once, before any timed child
    rows, backend = [], ""
    threads = {} if args.threads is None else {"MLX_LOOM_NATIVE_THREADS": str(args.threads),
                                               "OPENBLAS_NUM_THREADS": str(args.threads)}
    procs = []
    for config in args.configs:
        cmd = [sys.executable, __file__, "--child", "--target", args.target, "--configs", config,
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
               "--batch", *map(str, args.batch), "--temperatures", *map(str, args.temperatures)]
        proc = subprocess.Popen(cmd, env={**os.environ, **threads, **ENV.get(config, {})}, stdout=subprocess.PIPE,
                                text=True)
        procs.append((config, proc))
        if not args.parallel:
            proc.wait()
    for config, proc in procs:
        stdout, _ = proc.communicate()
        line = next((x for x in stdout.splitlines() if x.startswith("ROWS ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{config} failed (exit {proc.returncode}):\n{stdout[-3000:]}")
        out = json.loads(line[5:])
        rows += out["rows"]
        backend = out["backend"]
        print(stdout.replace(line, "").strip(), flush=True)
    load = os.getloadavg()
    md = report_16bit(rows, args) + (f"\nBackend: {backend}\n\nLoad average at the end (1/5/15 min): "
                                      f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs "
                                      "(the machine is shared: other processes took CPU during the run).\n")
    payload = {"machine": machine(), "target": args.target, "new_tokens": args.new_tokens, "repeats": args.repeats,
               "parallel": args.parallel, "threads": args.threads, "backend": backend, "load_average": load,
               "rows": rows}
    js, mdp = write_results(args.out, payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    ap.add_argument("--target", default="default", choices=["default", "float16", "bfloat16"])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", action="store_true",
                    help="16-bit target: run the configs' processes at once (compare CPU ms per token then)")
    ap.add_argument("--threads", type=int, default=None,
                    help="16-bit target: native and BLAS threads per process (1: CPU time is work, not spinning)")
    ap.add_argument("--out", default="bench_speculative")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.target != "default":
        args.configs = args.configs or ["plain-f32", "plain", "auto", "always-l1"]
        return parent_16bit(args)
    args.configs = args.configs or [c for c in CONFIGS if c not in ("auto-l2", "plain-f32")]

    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.models.loader import describe_backend, load_model

    loaded = load_model(None)
    rows = [measure(loaded, c, n, args, t) for n in args.batch for t in args.temperatures for c in args.configs]
    md = report(rows, args) + f"\nBackend: {describe_backend()}\n"
    payload = {"machine": machine(), "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows}
    js, mdp = write_results(args.out, payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
