"""Long prompts on the CPU: prompt tokens/s and time to first token, mlx-loom dense and sparse vs llama.cpp.

Systems, each given prompts of 512 / 2048 / 8192 tokens (--lengths):
  mlx-loom dense    the engine (EngineCore, default load of the GGUF, prefix cache on but every prompt
                    new), sparse prefill off; one request of N prompt tokens and max_tokens=1: TTFT is
                    the time from add() to its first token, as a server's client sees it minus HTTP.
  mlx-loom sparse   the same with sparse_prefill="auto" (the shipped per-head patterns where the cost
                    model says they pay).
  llama.cpp         `llama-bench -p N -n 0 -t 2` on the same GGUF (its "pp" test: the prompt's tokens
                    through the model, no sampling), built by benchmarks/build_llama_server.sh.
Every timed run of mlx-loom uses random token ids no earlier run sent (llama-bench also feeds random
tokens), after one warm-up run per length. Each mlx-loom system runs in its own process. Medians of
--repeats runs; ratios are mlx-loom tok/s over llama.cpp tok/s. --budgets sweeps the engine's token
budget per step (max_num_batched_tokens), i.e. the prefill chunk of a prompt that is alone.

    .venv/bin/python benchmarks/bench_prefill.py                       # all systems, 3 runs
    .venv/bin/python benchmarks/bench_prefill.py --systems mlx-loom-dense --budgets 256 512 1024 --name bench_prefill_budget
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import zlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, write_results  # noqa: E402

SYSTEMS = ("mlx-loom-dense", "mlx-loom-sparse", "llama.cpp")
LLAMA_BENCH = Path(__file__).resolve().parent / ".cache" / "llama-server" / "bin" / "llama-bench"


def random_prompt(vocab: int, skip: frozenset[int], n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < n:
        t = rng.randrange(vocab)
        if t not in skip:
            out.append(t)
    return out


def child(system: str, args) -> dict:
    """One mlx-loom system at one budget, every length: runs inside its own process."""
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.sched.config import EngineConfig, SchedulerConfig
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.engine.messages import AddRequest
    from mlx_loom.models.loader import describe_backend, load_model
    from mlx_loom.sched.params import SamplingParams

    loaded = load_model(args.model)
    sched = SchedulerConfig(max_num_batched_tokens=args.budget)
    sparse = "auto" if system == "mlx-loom-sparse" else "off"
    core = EngineCore(EngineConfig(scheduler=sched, sparse_prefill=sparse), loaded)
    skip = frozenset(getattr(loaded.tokenizer, "control_ids", ())) | frozenset(loaded.tokenizer.eos_token_ids)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    seed = iter(range(10**6))

    def once(n: int) -> float:
        rid = f"p{n}-{next(seed)}"
        prompt = random_prompt(loaded.vocab_size, skip, n, zlib.crc32(rid.encode()))
        got = 0
        t0 = time.perf_counter()
        core.add(AddRequest(rid, tuple(prompt), params))
        while core.has_unfinished():
            for out in core.step():
                assert out.error is None, out.error
                got += len(out.new_token_ids)
        assert got == 1, f"{rid}: no token came back"
        return time.perf_counter() - t0

    rows = []
    # the model's context holds the prompt and the one new token: an 8192-context model prefills 8191
    lengths = [min(n, core.scheduler.config.max_model_len - 1) for n in args.lengths]
    for n in lengths:
        once(n)  # warm-up at this length (first use of the shapes)
        times = [once(n) for _ in range(args.repeats)]
        rows.append({"tokens": n, "ttft_s": times, "ttft_median_s": median(times), "tok_per_s": n / median(times)})
        print(f"{system} budget {args.budget} N={n}: {rows[-1]['ttft_median_s']:.2f} s "
              f"({rows[-1]['tok_per_s']:.0f} tok/s)", file=sys.stderr, flush=True)
    return {"rows": rows, "backend": describe_backend(), "runner_path": core.runner.path,
            "sparse_chunks": core.runner.sparse_chunks, "budget": args.budget}


def run_child(system: str, budget: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", system, "--budget", str(budget), "--repeats", str(args.repeats),
           "--lengths", *map(str, args.lengths)] + (["--model", args.model] if args.model else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=dict(os.environ))
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{system} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def run_llama(args) -> dict | None:
    if not LLAMA_BENCH.exists():
        print(f"llama.cpp: {LLAMA_BENCH} not built (bash benchmarks/build_llama_server.sh); skipped", flush=True)
        return None
    from mlx_loom.models.loader import default_model_path

    cmd = [str(LLAMA_BENCH), "-m", args.model or default_model_path(), "-p", ",".join(map(str, args.lengths)),
           "-n", "0", "-t", "2", "-r", str(args.repeats), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = []
    for r in json.loads(out.stdout):
        n = int(r["n_prompt"])
        ts = [n / s for s in r["samples_ts"]]  # seconds per run
        rows.append({"tokens": n, "ttft_s": ts, "ttft_median_s": median(ts), "tok_per_s": n / median(ts)})
        print(f"llama.cpp N={n}: {rows[-1]['ttft_median_s']:.2f} s ({rows[-1]['tok_per_s']:.0f} tok/s)", flush=True)
    info = json.loads(out.stdout)[0]
    return {"rows": rows, "backend": f"llama.cpp {info.get('build_commit', '?')} ({info.get('cpu_info', '?')}, "
            f"{info.get('n_threads')} threads, n_batch {info.get('n_batch')}, n_ubatch {info.get('n_ubatch')}, "
            f"flash_attn {info.get('flash_attn')})", "command": " ".join(cmd)}


def markdown(results: dict, args) -> str:
    llama = {r["tokens"]: r for r in (results.get("llama.cpp") or {}).get("rows", [])}
    llama.update({n - 1: r for n, r in list(llama.items())})  # 8191 prefilled tokens vs llama-bench's 8192
    lines = ["# bench_prefill: long prompts on the CPU (time to first token)", "",
             f"Model: {args.model or 'default (SmolLM2-135M-Instruct.Q4_1.gguf)'}; {args.repeats} timed runs per "
             "point after a warm-up, medians; every mlx-loom run gets random prompt tokens no earlier run sent. "
             "mlx-loom: one request, max_tokens=1, TTFT from add() to its token; llama.cpp: llama-bench pp (same "
             "GGUF, 2 threads). ratio = mlx-loom tok/s / llama.cpp tok/s (an 8192-context model prefills 8191 "
             "tokens here: the one new token needs a position).", "",
             "| system | budget | tokens | TTFT s | prompt tok/s | vs llama.cpp |", "|---|---|---|---|---|---|"]
    for name, res in results.items():
        if not res:
            continue
        for r in res["rows"]:
            ref = llama.get(r["tokens"])
            ratio = f"{r['tok_per_s'] / ref['tok_per_s']:.2f}x" if ref and name != "llama.cpp" else ""
            lines.append(f"| {name.split('@')[0]} | {res.get('budget', '')} | {r['tokens']} | {r['ttft_median_s']:.2f} | "
                         f"{r['tok_per_s']:.0f} | {ratio} |")
    lines += ["", "Backends:"] + [f"- {k}: {v['backend']}" + (f"; path: {v['runner_path']}" if "runner_path" in v else "")
                                 for k, v in results.items() if v]
    meta = machine()
    lines += ["", f"Machine: {meta['platform']}, {meta['cpus']} CPUs, {meta['date']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--budgets", type=int, nargs="+", default=[512], help="max_num_batched_tokens values to run")
    ap.add_argument("--name", default="bench_prefill")
    ap.add_argument("--child", choices=SYSTEMS[:2])
    ap.add_argument("--budget", type=int, default=512)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return
    results: dict[str, dict | None] = {}
    for system in args.systems:
        if system == "llama.cpp":
            results[system] = run_llama(args)
            continue
        for budget in args.budgets:
            results[f"{system}@{budget}"] = run_child(system, budget, args)
    payload = {"machine": machine(), "lengths": args.lengths, "repeats": args.repeats, "results": results}
    js, md = write_results(args.name, payload, markdown(results, args))
    print(md.read_text())
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
