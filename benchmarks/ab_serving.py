"""Served A/B in turns: two servers up at once (this checkout's mlx-loom and --loom-base-root's, this
checkout with --no-async-decode, or llama.cpp's llama-server), driven round after round, one after
the other, at each N and sampling pass, so that a shared machine's drifting load falls on both alike.

Each round sends --requests closed-loop streaming requests (benchmarks/bench_serving.py: 64 tokens,
ignore_eos, the sampled pass at temperature 0.7 with a seed per request) to A, then the same
prompts to B (the order alternates between rounds). Reported per (pass, N): each side's output
tok/s and TTFT p50 for every round, their medians, and B/A of the medians.

    .venv/bin/python benchmarks/ab_serving.py --loom-base-root /tmp/base --concurrency 1 8 --rounds 4
    .venv/bin/python benchmarks/ab_serving.py --variant mlx-loom-sync     # async decode on vs off
    .venv/bin/python benchmarks/ab_serving.py --variant llama-server      # against llama.cpp, in turns

Writes benchmarks/results/<--out>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine, write_results  # noqa: E402
from bench_serving import SAMPLING, Target, detect, run_closed, served_model  # noqa: E402
from run_serving import CACHE, RunningServer, _kill_all, backend_of, default_gguf, make_spec  # noqa: E402


def _spec_args(ns: argparse.Namespace) -> argparse.Namespace:
    """The attributes run_serving.make_spec reads (its defaults: llama-server on every CPU, one slot per
    request of the largest N)."""
    return argparse.Namespace(concurrency=ns.concurrency, threads=os.cpu_count() or 1, loom_max_num_seqs=128,
                              loom_args="", gguf=None, loom_base_root=ns.loom_base_root, llama_server_bin=None,
                              llama_parallel=None, llama_ctx_per_seq=256)


def _round(target: Target, mode: str, n: int, count: int, max_tokens: int, run: int) -> dict:
    from dataclasses import replace

    r = asyncio.run(run_closed(replace(target, sampling=mode), n, count, max_tokens, 600.0, run=run))
    return {"output_tok_s": r["output_tok_s"], "ttft_ms_p50": r["ttft_ms"]["median"], "errors": r["errors"],
            "completed": r["completed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=["mlx-loom-base", "mlx-loom-sync", "llama-server"], default="mlx-loom-base")
    ap.add_argument("--loom-base-root", default=None)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--sampling", nargs="+", choices=list(SAMPLING), default=["sampled"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=None, help="per round (default max(4, N))")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="bench_serving_ab")
    ap.add_argument("--variant-first", action="store_true",
                    help="start the other server first (two copies of mlx-loom ran ~5-10%% faster in the second "
                         "server's place, rounds alternating: run both orders)")
    args = ap.parse_args()
    spec_args = _spec_args(args)
    specs = [make_spec("mlx-loom", spec_args, default_gguf()), make_spec(args.variant, spec_args, default_gguf())]
    if args.variant_first:
        specs.reverse()
    if None in specs:
        sys.exit("ab_serving: a server could not be specified (see stderr)")
    records = {s.name: {"command": s.cmd, "settings": s.settings} for s in specs}
    results: dict = {}
    try:
        with RunningServer(specs[0], CACHE / "logs", 600) as a, RunningServer(specs[1], CACHE / "logs", 600) as b:
            targets = []
            for srv in (a, b):
                target = Target(srv.spec.base_url, name=srv.spec.name, model=served_model(srv.spec.base_url))
                records[srv.spec.name]["backend"] = backend_of(srv.spec)
                records[srv.spec.name]["probe"] = detect(target)  # sets ignore_eos where honoured
                asyncio.run(run_closed(target, 2, 2, args.max_tokens, 600.0, run=0))  # warm-up
                targets.append(target)
            run = 100  # every round its own prompts (both servers the same ones): no pass meets a cache
            for mode in args.sampling:  # that an earlier pass warmed
                for n in args.concurrency:
                    count = args.requests or max(4, n)
                    rounds = {t.name: [] for t in targets}
                    for k in range(args.rounds):
                        run += 1
                        for t in (targets if k % 2 == 0 else targets[::-1]):
                            rounds[t.name].append(_round(t, mode, n, count, args.max_tokens, run=run))
                        print(mode, n, k, {name: f"{r[-1]['output_tok_s']:.1f} tok/s" for name, r in rounds.items()},
                              flush=True)
                    results[f"{mode} N={n}"] = rounds
    finally:
        _kill_all()
    names = ["mlx-loom", args.variant]  # the table's order, whichever started first
    write_results(args.out, {"machine": machine(), "args": vars(args), "servers": records, "results": results},
                  _markdown(names, records, results, args))


def _markdown(names: list[str], records: dict, results: dict, args) -> str:
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    lines = [f"# Served A/B in turns (benchmarks/ab_serving.py): {names[0]} vs {names[1]}", "",
             f"{args.rounds} rounds per row, the two servers alternating (both up at once), "
             f"{args.max_tokens} tokens per request, ignore_eos; sampled = temperature 0.7 with a seed per "
             f"request. Started first: {names[1] if args.variant_first else names[0]}. "
             f"Machine: {machine()['platform']}, {machine()['cpus']} CPUs, {machine()['date']}.", "",
             f"| pass, N | {names[0]} tok/s per round | {names[1]} tok/s per round | median {names[0]} / "
             f"{names[1]} | TTFT p50 ms (median of rounds) {names[0]} / {names[1]} |", "|---|---|---|---|---|"]
    for key, rounds in results.items():
        a, b = rounds[names[0]], rounds[names[1]]
        per = lambda rs: ", ".join(f"{r['output_tok_s']:.1f}" for r in rs)  # noqa: E731
        ratio = med(a, "output_tok_s") / med(b, "output_tok_s")
        lines.append(f"| {key} | {per(a)} | {per(b)} | {ratio:.2f}x | {med(a, 'ttft_ms_p50'):.0f} / "
                     f"{med(b, 'ttft_ms_p50'):.0f} |")
    lines += ["", "Servers:", ""]
    for name in names:
        r = records[name]
        lines.append(f"- **{name}**: backend {r.get('backend', '?')}; "
                     + "; ".join(f"{k}={v}" for k, v in r["settings"].items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
