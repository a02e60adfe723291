"""Hybrid (recurrent-state) throughput and prefix-hit TTFT: mlx-loom vs mlx-lm on a Qwen3.5-shaped model.

The checkpoint is benchmarks/qwen35_checkpoint.py's random 4-bit Qwen3.5-shaped model (~135M, 18
Gated DeltaNet + 6 full-attention layers). Systems: "mlx-loom" (EngineCore: its state slots and
paged KV, the model's own mlx-lm code, quantized layers on the native CPU kernels), "mlx-lm"
(BatchGenerator, all N in one decode batch, on the float32-dequantized weights with MLX's and
mlx-lm's own modules: its fastest CPU setup) and "mlx-lm-step" (generate_step, N = 1 only, same
weights as mlx-lm). N varied chat prompts, exactly --new-tokens greedy tokens each (EOS ignored);
tok/s = N x new tokens / (prefill + decode time); each (system, N) in its own process (peak RSS is
per configuration), one short warm-up run (at most 8 of the prompts, 4 tokens each), then --repeats
timed runs (median).

Prefix hit: a --shared-tokens shared prompt plus a short distinct suffix; time to the first token
of a cold request (nothing cached) and of a second request over the same shared prompt (its KV
blocks and its state snapshot restored, only the suffix prefilled), mlx-loom only.

    .venv/bin/python benchmarks/bench_hybrid.py                      # N = 1 8 32 100, 4k shared prompt
    .venv/bin/python benchmarks/bench_hybrid.py --batch 1 8 --repeats 1 --out bench_hybrid_quick
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

from _common import chat_prompts, machine, median, peak_rss_mb, run_batch, write_results  # noqa: E402

SYSTEMS = ["mlx-loom", "mlx-lm", "mlx-lm-step"]
WARM_ROWS = 8
"""Prompts in the warm-up run (4 tokens each): its shapes and code paths, not N prompts' prefill again."""


def run_loom(model: str, n: int, new_tokens: int, repeats: int) -> dict:
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.models.loader import describe_backend, load_model
    from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig
    from mlx_loom.sched.params import SamplingParams

    loaded = load_model(model)
    runs = [chat_prompts(loaded.tokenizer, n, run) for run in range(repeats + 1)]  # [0]: warm-up
    blocks = n * -(-(max(len(p) for r in runs for p in r) + new_tokens) // 16) + 64
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=blocks, num_state_slots=max(n, 4)),
                          scheduler=SchedulerConfig(max_num_seqs=max(n, 1), max_num_batched_tokens=max(512, n)))
    core = EngineCore(config, loaded)
    core.warm_up()
    run_batch(core, runs[0][:WARM_ROWS], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), "warm")
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    _mark_timed_start()
    timed = [run_batch(core, prompts, params, f"run{r}") for r, prompts in enumerate(runs[1:], 1)]
    return {"times_s": [b.seconds for b in timed], "backend": describe_backend(), "path": core.runner.path,
            "state_slots": core.scheduler.state_slots.num_slots}


def _mlx_lm_model(model: str):
    import mlx_loom.kernels  # noqa: F401
    import mlx.core as mx

    from mlx_loom.models.loader import load_model
    from mlx_loom.models.routing import unroute_model

    loaded = load_model(model, dequantize=mx.default_device() == mx.cpu)  # its fastest CPU setup
    unroute_model(loaded.model)  # MLX's and mlx-lm's own modules, not our kernels
    return loaded


def run_mlx_lm(model: str, n: int, new_tokens: int, repeats: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlx_loom.models.loader import describe_backend

    loaded = _mlx_lm_model(model)

    def once(run: int, tokens: int, rows: int = n) -> float:
        prompts = chat_prompts(loaded.tokenizer, n, run)[:rows]
        gen = BatchGenerator(loaded.model, max_tokens=tokens, completion_batch_size=max(n, 1))
        gen.insert(prompts, [tokens] * rows)
        t0, produced = time.perf_counter(), 0
        while responses := gen.next_generated():
            produced += len(responses)
        mx.synchronize()
        dt = time.perf_counter() - t0
        gen.close()
        assert produced == rows * tokens, (produced, rows * tokens)
        return dt

    once(0, 4, min(n, WARM_ROWS))
    _mark_timed_start()
    return {"times_s": [once(r, new_tokens) for r in range(1, repeats + 1)], "backend": describe_backend(),
            "completion_batch_size": max(n, 1)}


def run_mlx_lm_step(model: str, n: int, new_tokens: int, repeats: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_loom.models.loader import describe_backend

    assert n == 1, "generate_step runs one sequence"
    loaded = _mlx_lm_model(model)

    def once(run: int, tokens: int) -> float:
        (prompt,) = chat_prompts(loaded.tokenizer, 1, run)
        t0 = time.perf_counter()
        produced = sum(1 for _ in generate_step(mx.array(prompt), loaded.model, max_tokens=tokens,
                                                 sampler=lambda x: x.argmax(-1)))
        dt = time.perf_counter() - t0
        assert produced == tokens
        return dt

    once(0, 4)
    _mark_timed_start()
    return {"times_s": [once(r, new_tokens) for r in range(1, repeats + 1)], "backend": describe_backend()}


def run_prefix(model: str, shared_tokens: int) -> dict:
    """TTFT of a cold request over a shared prompt, then of a second one that hits it (mlx-loom)."""
    import mlx_loom.kernels  # noqa: F401
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.engine.messages import AddRequest
    from mlx_loom.models.loader import describe_backend, load_model
    from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig
    from mlx_loom.sched.params import SamplingParams

    loaded = load_model(model)
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=2 * shared_tokens // 16 + 64),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512))
    core = EngineCore(config, loaded)
    core.warm_up()
    shared = [3 + (7919 * i) % 40000 for i in range(shared_tokens)]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def ttft(rid: str, prompt: list[int]) -> tuple[float, int]:
        core.add(AddRequest(rid, tuple(prompt), params))
        t0 = time.perf_counter()
        while core.has_unfinished():
            outs = core.step()
            if any(o.request_id == rid and o.new_token_ids for o in outs):
                dt = time.perf_counter() - t0
        return dt, next(o for o in outs if o.request_id == rid).num_cached_tokens

    core.add(AddRequest("warm", tuple(range(10, 60)), params))  # a short run first: no first-step costs
    while core.has_unfinished():
        core.step()
    cold, _ = ttft("cold", shared + [11, 12, 13, 14, 15])
    hit, cached = ttft("hit", shared + [21, 22, 23, 24, 25, 26])
    return {"shared_tokens": shared_tokens, "cold_ttft_s": cold, "hit_ttft_s": hit, "hit_cached_tokens": cached,
            "hit_over_cold": hit / cold, "backend": describe_backend()}


def _mark_timed_start() -> None:
    """Tells the parent (wall clock) that loading and warm-up are over: a cell cut short by its timeout
    after this point ran its first timed run for at least the rest of the timeout."""
    print(f"TIMED_START {time.time()}", flush=True)


def _timed_lower_bound(stdout: str | bytes | None, started: float, timeout: float) -> float | None:
    """Seconds the first timed run had been running, unfinished, when the cell was killed (None: it was
    still loading or warming up)."""
    text = stdout.decode(errors="replace") if isinstance(stdout, bytes) else (stdout or "")
    marks = [float(line.split()[1]) for line in text.splitlines() if line.startswith("TIMED_START ")]
    return started + timeout - marks[-1] if marks else None


RUNNERS = {"mlx-loom": run_loom, "mlx-lm": run_mlx_lm, "mlx-lm-step": run_mlx_lm_step}


def child(args) -> None:
    if args.child == "prefix":
        res = run_prefix(args.model, args.shared_tokens)
    else:
        res = RUNNERS[args.child](args.model, args.batch[0], args.new_tokens, args.repeats)
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res))


def measure(kind: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--batch", str(n), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--model", args.model, "--shared-tokens", str(args.shared_tokens)]
    started = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=dict(os.environ),
                             timeout=args.cell_timeout)
    except subprocess.TimeoutExpired as e:  # recorded: it did not finish its runs within the limit
        row = {"system": kind, "batch": n, "timed_out_s": args.cell_timeout}
        if (ran := _timed_lower_bound(e.stdout, started, args.cell_timeout)) is not None:
            row["timed_run_unfinished_after_s"] = ran  # its tok/s is below N x tokens / ran
            row["tok_per_s_below"] = n * args.new_tokens / ran
        print(f"{kind:12s} N={n:<4d} did not finish within {args.cell_timeout} s "
              f"(timed run unfinished after {ran if ran is None else round(ran)} s)", flush=True)
        return row
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{kind} N={n} failed:\n{out.stderr[-3000:]}")
    res = json.loads(line[7:])
    if kind != "prefix":
        t = median(res["times_s"])
        res.update(system=kind, batch=n, median_s=t, tok_per_s=n * args.new_tokens / t)
        print(f"{kind:12s} N={n:<4d} {res['tok_per_s']:8.1f} tok/s  peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    else:
        print(f"prefix: cold TTFT {res['cold_ttft_s']:.2f} s, hit {res['hit_ttft_s']:.2f} s "
              f"({100 * res['hit_over_cold']:.0f}%), {res['hit_cached_tokens']} tokens cached", flush=True)
    return res


def report(rows: list[dict], prefix: dict | None, args, load: tuple[float, ...] | None = None) -> str:
    """The Markdown table; load: the host's load averages when the last cell ended (default: now)."""
    load = load or os.getloadavg()
    by = {(r["system"], r["batch"]): r for r in rows}
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    head = ["N"] + [f"{s} tok/s" for s in systems] + [f"mlx-loom / {s}" for s in systems if s != "mlx-loom"] + \
        [f"{s} peak RSS MB" for s in systems]
    lines = [
        "# bench_hybrid: a Qwen3.5-shaped hybrid, mlx-loom vs mlx-lm (BatchGenerator, generate_step)",
        "",
        f"Model: {args.model} (random weights, 4-bit; benchmarks/qwen35_checkpoint.py). mlx-loom: EngineCore "
        "(state slots + paged KV, the model's own code, native 4-bit kernels); mlx-lm: BatchGenerator (all N in one "
        "decode batch) and generate_step (N = 1) on float32-dequantized weights with its own modules. "
        f"{args.new_tokens} greedy new tokens per request (EOS ignored), varied chat prompts; tok/s = N x "
        f"{args.new_tokens} / (prefill + decode time); median of {args.repeats} run(s) after a short warm-up (at most {WARM_ROWS} prompts, 4 tokens); "
        "each cell its own process.",
        f"Backend: {next((r['backend'] for r in [*rows, prefix or {}] if r.get('backend')), '?')}",
        "Host load average (1/5/15 min) when the last cell ended: "
        + " / ".join(f"{x:.1f}" for x in load) + f" on {os.cpu_count()} CPUs (a shared machine: "
        "compare ratios within one run).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for n in args.batch:
        loom = by.get(("mlx-loom", n))
        cells = [str(n)] + [_tok_per_s(by.get((s, n)), n, args) for s in systems]
        cells += [_ratio(loom, by.get((s, n))) for s in systems if s != "mlx-loom"]
        cells += [f"{by[(s, n)]['peak_rss_mb']:.0f}" if _done(by.get((s, n))) else "-" for s in systems]
        lines.append("| " + " | ".join(cells) + " |")
    if any("timed_out_s" in r for r in rows):
        lines += ["", "timeout: the cell's process (load, warm-up and timed runs) did not finish within "
                  "--cell-timeout seconds on this machine at this load; no tok/s is claimed for it. Where its "
                  "first timed run had started (after loading and warm-up) and ran t seconds without finishing, "
                  "its tok/s is below N x new tokens / t: shown as '< x', and the ratio as '> y'."]
    if prefix and "timed_out_s" in prefix:
        lines += ["", f"Prefix hit: the cold {args.shared_tokens}-token prefill did not finish within "
                  f"{prefix['timed_out_s']} s."]
        prefix = None
    if prefix:
        lines += ["", f"Prefix hit (mlx-loom): a {prefix['shared_tokens']}-token shared prompt plus a short suffix. "
                  f"Cold TTFT {prefix['cold_ttft_s']:.2f} s; second request over the same prompt "
                  f"{prefix['hit_ttft_s']:.3f} s ({100 * prefix['hit_over_cold']:.1f}% of cold; "
                  f"{prefix['hit_cached_tokens']} prompt tokens from the cache: KV blocks and a state snapshot)."]
    return "\n".join(lines) + "\n"


def _done(row: dict | None) -> bool:
    return row is not None and "tok_per_s" in row


def _ratio(loom: dict | None, other: dict | None) -> str:
    """mlx-loom / other; a lower bound where the other was cut short in its timed run."""
    if not _done(loom) or other is None:
        return "-"
    if _done(other):
        return f"{loom['tok_per_s'] / other['tok_per_s']:.2f}x"
    return f"> {loom['tok_per_s'] / other['tok_per_s_below']:.1f}x" if "tok_per_s_below" in other else "-"


def _tok_per_s(row: dict | None, n: int, args) -> str:
    if row is None:
        return "-"
    if "tok_per_s_below" in row:
        return f"< {row['tok_per_s_below']:.2f} (timeout {row['timed_out_s']} s)"
    if "timed_out_s" in row:
        return f"timeout ({row['timed_out_s']} s)"
    return f"{row['tok_per_s']:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 100])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--shared-tokens", type=int, default=4096)
    ap.add_argument("--model", default=None, help="mlx-lm directory (default: benchmarks/qwen35_checkpoint.py's)")
    ap.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    ap.add_argument("--no-prefix", action="store_true", help="skip the prefix-hit TTFT measurement")
    ap.add_argument("--child", choices=[*SYSTEMS, "prefix"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench_hybrid")
    ap.add_argument("--cell-timeout", type=int, default=1800, help="seconds one (system, N) process may run")
    ap.add_argument("--report-from", default=None, metavar="JSON",
                    help="only rewrite the Markdown report of a results JSON this script wrote")
    args = ap.parse_args()
    if args.report_from:
        data = json.loads(Path(args.report_from).read_text())
        md = report(data["rows"], data["prefix"], argparse.Namespace(**data["args"]), data["machine"]["load_average"])
        Path(args.report_from).with_suffix(".md").write_text(md)
        return print(md)
    if args.model is None:
        from qwen35_checkpoint import checkpoint

        args.model = str(checkpoint())
    if args.child:
        return child(args)
    prefix = None if args.no_prefix else measure("prefix", 1, args)
    rows: list[dict] = []
    for n in args.batch:  # the results are rewritten after every cell: a cut-short run keeps what it measured
        for s in args.systems:
            if s != "mlx-lm-step" or n == 1:
                rows.append(measure(s, n, args))
                md = report(rows, prefix, args)
                payload = {"machine": {**machine(), "load_average": os.getloadavg()}, "args": vars(args),
                           "rows": rows, "prefix": prefix}
                js, mdp = write_results(args.out, payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
