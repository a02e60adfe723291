"""Fairness: time to first token of short requests that arrive while a long prompt is prefilling.

The case from the hardening issue: a ~3.5k-token prompt starts at t = 0, short chat requests
arrive at t = --arrive-s; each system serves them in one process, stepping its own engine.
Systems: "mlx-loom" (default: while others wait or decode, a prompt takes at most
long_prefill_chunk tokens per step), "mlx-loom-nocap" (long_prefill_chunk = 0: a prompt takes the
whole token budget every step, the behaviour before), and "mlx-lm" (BatchGenerator on the float32
weights, its best CPU setup; prompts are inserted when they arrive). Every timed run uses prompts
no earlier run sent (cold prefix cache for every system). TTFT counts from the arrival time, so
a step already running when a request arrives counts against it, as it would in a server.

    .venv/bin/python benchmarks/bench_fairness.py                  # all systems, 3 runs each
    .venv/bin/python benchmarks/bench_fairness.py --systems mlx-loom --repeats 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import chat_prompts, machine, median, write_results  # noqa: E402

SYSTEMS = ("mlx-loom", "mlx-loom-nocap", "mlx-lm")
PARAGRAPH = ("Section {run}.{i}: the committee reviewed item {i} of the {run} agenda, noted the budget "
             "figures, the schedule for the next quarter and the open questions from the previous meeting. ")


def long_prompt(tokenizer, tokens: int, run: int) -> list[int]:
    """A chat prompt of about `tokens` tokens whose text is new for every run."""
    body, i = "", 0
    while len(tokenizer.encode(body)) < tokens - 40:
        body += PARAGRAPH.format(run=run, i=i) * 4
        i += 1
    msgs = [{"role": "user", "content": f"Summarize these minutes in one sentence.\n\n{body}"}]
    return tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=True))


def workload(tokenizer, args, run: int) -> tuple[list[int], list[list[int]]]:
    return long_prompt(tokenizer, args.long_tokens, run), chat_prompts(tokenizer, args.short, run)


def run_loom(args, cap: int | None) -> dict:
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.sched.config import EngineConfig, SchedulerConfig
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.engine.messages import AddRequest
    from mlx_loom.models.loader import describe_backend, load_model
    from mlx_loom.sched.params import SamplingParams

    loaded = load_model(args.model)
    sched = SchedulerConfig() if cap is None else SchedulerConfig(long_prefill_chunk=cap)
    core = EngineCore(EngineConfig(scheduler=sched), loaded)
    long_params = SamplingParams(max_tokens=args.long_new, temperature=0.0, ignore_eos=True)
    short_params = SamplingParams(max_tokens=args.short_new, temperature=0.0, ignore_eos=True)

    def once(run: int) -> dict:
        long, shorts = workload(loaded.tokenizer, args, run)
        first: dict[str, float] = {}
        t0 = time.perf_counter()
        core.add(AddRequest(f"long{run}", tuple(long), long_params))
        pending = True
        while core.has_unfinished() or pending:
            if pending and time.perf_counter() - t0 >= args.arrive_s:
                for i, p in enumerate(shorts):
                    core.add(AddRequest(f"s{run}-{i}", tuple(p), short_params))
                pending = False
            for out in core.step():
                if out.new_token_ids and out.request_id not in first:
                    first[out.request_id] = time.perf_counter() - t0
                assert out.error is None, out.error
            if not core.has_unfinished() and pending:
                time.sleep(0.001)
        return _run_result(first, f"long{run}", [f"s{run}-{i}" for i in range(len(shorts))], args,
                           len(long), time.perf_counter() - t0)

    once(0)  # warm-up
    return {"runs": [once(r) for r in range(1, args.repeats + 1)], "backend": describe_backend(),
            "long_prefill_chunk": core.scheduler.config.long_prefill_chunk,
            "max_num_batched_tokens": core.scheduler.config.max_num_batched_tokens}


def run_mlx_lm(args) -> dict:
    import mlx_loom.kernels  # noqa: F401
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlx_loom.models.routing import unroute_model
    from mlx_loom.models.loader import describe_backend, load_model

    loaded = load_model(args.model, dequantize=mx.default_device() == mx.cpu)  # its fastest CPU setup
    unroute_model(loaded.model)  # the peer runs MLX's and mlx-lm's own modules, not our kernels

    def once(run: int) -> dict:
        long, shorts = workload(loaded.tokenizer, args, run)
        gen = BatchGenerator(loaded.model, max_tokens=args.long_new, completion_batch_size=32)
        names: dict[int, str] = {}
        first: dict[str, float] = {}
        left = args.long_new + args.short_new * len(shorts)
        t0 = time.perf_counter()
        (uid,) = gen.insert([long], [args.long_new])
        names[uid] = f"long{run}"
        pending = True
        while left:
            if pending and time.perf_counter() - t0 >= args.arrive_s:
                for i, u in enumerate(gen.insert(shorts, [args.short_new] * len(shorts))):
                    names[u] = f"s{run}-{i}"
                pending = False
            _, generated = gen.next()
            for r in generated:
                first.setdefault(names[r.uid], time.perf_counter() - t0)
                left -= 1
            if not generated and pending:
                time.sleep(0.001)
        mx.synchronize()
        gen.close()
        return _run_result(first, f"long{run}", [f"s{run}-{i}" for i in range(len(shorts))], args,
                           len(long), time.perf_counter() - t0)

    once(0)
    return {"runs": [once(r) for r in range(1, args.repeats + 1)], "backend": describe_backend() +
            "; mlx-lm BatchGenerator, float32 weights"}


def _run_result(first: dict[str, float], long_id: str, short_ids: list[str], args, long_len: int,
                total: float) -> dict:
    return {"short_ttft_s": [first[s] - args.arrive_s for s in short_ids], "long_ttft_s": first[long_id],
            "long_prompt_tokens": long_len, "total_s": total}


def summarize(system: str, data: dict) -> dict:
    runs = data["runs"]
    worst = [max(r["short_ttft_s"]) for r in runs]
    return {"system": system, "short_ttft_median_s": median([t for r in runs for t in r["short_ttft_s"]]),
            "short_ttft_worst_median_s": median(worst), "long_ttft_median_s": median([r["long_ttft_s"] for r in runs]),
            "total_median_s": median([r["total_s"] for r in runs]),
            "long_prompt_tokens": runs[0]["long_prompt_tokens"], "backend": data["backend"],
            **{k: data[k] for k in ("long_prefill_chunk", "max_num_batched_tokens") if k in data}}


def markdown(rows: list[dict], args, meta: dict) -> str:
    lines = [
        "# bench_fairness: short requests behind a long prompt (time to first token)", "",
        f"Model: {args.model or 'default (SmolLM2-135M-Instruct GGUF)'}. A {rows[0]['long_prompt_tokens']}-token "
        f"prompt ({args.long_new} new tokens) starts at t = 0; {args.short} short chat requests "
        f"({args.short_new} new tokens each) arrive at t = {args.arrive_s} s. TTFT counts from arrival. "
        f"Median of {args.repeats} runs after a warm-up; every run sends new prompts (cold cache for all).", "",
        f"Machine: {meta['platform']}, {meta['cpus']} CPUs, {meta['date']}.", "",
        "| system | short TTFT median s | worst short TTFT s | long prompt TTFT s | all done s | backend |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["system"] + (f" (long_prefill_chunk {r['long_prefill_chunk']})" if "long_prefill_chunk" in r else "")
        lines.append(f"| {name} | {r['short_ttft_median_s']:.2f} | {r['short_ttft_worst_median_s']:.2f} | "
                     f"{r['long_ttft_median_s']:.2f} | {r['total_median_s']:.2f} | {r['backend']} |")
    return "\n".join(lines) + "\n"


def worker(system: str, args) -> dict:
    if system == "mlx-lm":
        return run_mlx_lm(args)
    return run_loom(args, cap=0 if system == "mlx-loom-nocap" else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--long-tokens", type=int, default=3532)
    ap.add_argument("--long-new", type=int, default=4)
    ap.add_argument("--short", type=int, default=4, help="short requests arriving together")
    ap.add_argument("--short-new", type=int, default=4)
    ap.add_argument("--arrive-s", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_fairness")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = []
    for system in args.systems:  # each system in its own process
        cmd = [sys.executable, __file__, "--worker", system, *_passthrough(args)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(summarize(system, json.loads(out.strip().splitlines()[-1])))
        print(json.dumps(rows[-1]), flush=True)
    meta = machine()
    payload = {"machine": meta, "args": {k: v for k, v in vars(args).items() if k != "worker"}, "results": rows}
    js, md = write_results(args.out, payload, markdown(rows, args, meta))
    print(f"wrote {js} and {md}")


def _passthrough(args) -> list[str]:
    out = ["--long-tokens", str(args.long_tokens), "--long-new", str(args.long_new), "--short", str(args.short),
           "--short-new", str(args.short_new), "--arrive-s", str(args.arrive_s), "--repeats", str(args.repeats)]
    return out + (["--model", args.model] if args.model else [])


if __name__ == "__main__":
    main()
