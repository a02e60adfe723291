"""Offline engine throughput: mlx-loom's EngineCore vs mlx-lm's BatchGenerator and llama.cpp.

Systems: "mlx-loom" (the default load: GGUF weights kept 4/8-bit on the native CPU kernels
when built, decode steps on the fused native decoder layer), "mlx-loom-ops" (same weights and
matmul kernels, every layer as separate MLX ops: MLX_LOOM_NATIVE_DECODE=0), "mlx-loom-generic"
(the model's own mlx-lm code over the paged pools even where a specialization applies:
MLX_LOOM_GENERIC_FORWARD=1; not in the default set), "mlx-loom-f32" (weights dequantized to float32 through OpenBLAS: the path before
the native kernels), "mlx-lm" (BatchGenerator on the float32 weights, its best CPU setup, with MLX's and
mlx-lm's own modules: the loader's switches to our kernels undone), and
"llama.cpp" (llama-batched-bench on the same GGUF, 2 threads, N parallel sequences of a
--llama-prompt-tokens prompt and --new-tokens generated tokens; built by
benchmarks/build_llama_server.sh; its tok/s counts prompt processing + generation time, like ours).
Same prompts: N varied chat prompts, exactly --new-tokens greedy tokens each (EOS ignored so
all do the same work). Each (system, N) runs in its own subprocess so peak RSS is per
configuration; each does one warm-up run, then --repeats timed runs (median).

    .venv/bin/python benchmarks/bench_engine.py                # N = 1 8 32 100
    .venv/bin/python benchmarks/bench_engine.py --batch 8 --repeats 1
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


def run_loom(model_path, n: int, new_tokens: int, repeats: int, dequantize: bool | None = None) -> dict:
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.models.loader import describe_backend, load_model
    from mlx_loom.sched.params import SamplingParams

    loaded = load_model(model_path, dequantize=dequantize)
    runs = [chat_prompts(loaded.tokenizer, n, run) for run in range(repeats + 1)]  # [0]: warm-up
    blocks_per_req = -(-(max(len(p) for prompts in runs for p in prompts) + new_tokens) // 16)
    # Room for the batch plus prefix-cache slack; memory grows with N like any KV cache.
    config = EngineConfig(
        cache=CacheConfig(block_size=16, num_blocks=n * blocks_per_req + 64),
        scheduler=SchedulerConfig(max_num_seqs=max(n, 1), max_num_batched_tokens=max(512, n)),
    )
    core = EngineCore(config, loaded)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    run_batch(core, runs[0], params, "warm")
    timed = [run_batch(core, prompts, params, f"run{r}") for r, prompts in enumerate(runs[1:], 1)]
    return {"times_s": [b.seconds for b in timed], "backend": describe_backend(),
            "num_blocks": config.cache.num_blocks, "cache": "prefix caching on", **cache_note(timed)}


def run_mlx_lm(model_path, n: int, new_tokens: int, repeats: int) -> dict:
    import mlx_loom.kernels  # noqa: F401
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlx_loom.models.routing import unroute_model
    from mlx_loom.models.loader import describe_backend, load_model

    loaded = load_model(model_path, dequantize=mx.default_device() == mx.cpu)  # its fastest CPU setup
    unroute_model(loaded.model)  # the peer runs MLX's and mlx-lm's own modules, not our kernels

    def once(run: int) -> float:
        prompts = chat_prompts(loaded.tokenizer, n, run)
        # Decode the whole batch at once (its best case); prefill in its default groups of 8.
        gen = BatchGenerator(loaded.model, max_tokens=new_tokens, completion_batch_size=max(n, 1))
        gen.insert(prompts, [new_tokens] * n)
        t0 = time.perf_counter()
        produced = 0
        while responses := gen.next_generated():
            produced += len(responses)
        mx.synchronize()
        dt = time.perf_counter() - t0
        gen.close()
        assert produced == n * new_tokens, (produced, n * new_tokens)
        return dt

    once(0)
    times = [once(r) for r in range(1, repeats + 1)]
    prompt_tokens = [sum(map(len, chat_prompts(loaded.tokenizer, n, r))) for r in range(1, repeats + 1)]
    return {"times_s": times, "backend": describe_backend(), "completion_batch_size": max(n, 1),
            "prefill_batch_size": 8, "cache": "no prefix cache (a fresh BatchGenerator per run)",
            "prompt_tokens_per_run": sum(prompt_tokens) / len(prompt_tokens), "cached_tokens_per_run": 0.0}


def child(args) -> None:
    if args.system == "mlx-lm":
        res = run_mlx_lm(args.model, args.batch[0], args.new_tokens, args.repeats)
    else:
        dequantize = True if args.system == "mlx-loom-f32" else None
        res = run_loom(args.model, args.batch[0], args.new_tokens, args.repeats, dequantize)
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res))


SYSTEMS = ["mlx-loom", "mlx-loom-ops", "mlx-loom-generic", "mlx-loom-f32", "mlx-lm", "llama.cpp"]
LLAMA_BIN = Path(__file__).resolve().parent / ".cache" / "llama-server" / "bin" / "llama-batched-bench"


def measure_llama(n: int, args, rows: list[dict]) -> dict | None:
    """llama.cpp's own batched decoding on the GGUF: median of --repeats runs (None if not built).
    Its prompts are as long as ours at this N on average (from an earlier row of this run), else
    --llama-prompt-tokens."""
    if not LLAMA_BIN.exists():
        print(f"llama.cpp: {LLAMA_BIN} not built (bash benchmarks/build_llama_server.sh); skipped", flush=True)
        return None
    from mlx_loom.models.loader import default_model_path

    gguf = args.model or default_model_path()
    ours = next((r for r in rows if r["batch"] == n and r.get("prompt_tokens_per_run")), None)
    npp = round(ours["prompt_tokens_per_run"] / n) if ours else args.llama_prompt_tokens
    ctx = max(2048, n * (npp + args.new_tokens) + 256)
    cmd = [str(LLAMA_BIN), "-m", gguf, "-c", str(ctx), "-b", "2048", "-ub", "512", "-t", "2",
           "-npp", str(npp), "-ntg", str(args.new_tokens), "-npl", str(n),
           "--output-format", "jsonl"]
    runs = []
    for _ in range(args.repeats + 1):  # the first is the warm-up
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1]))
    runs = runs[1:]
    t = median([r["t"] for r in runs])
    res = {"system": "llama.cpp", "batch": n, "times_s": [r["t"] for r in runs], "median_s": t,
           "tok_per_s": n * args.new_tokens / t, "decode_tok_per_s": median([r["speed_tg"] for r in runs]),
           "peak_rss_mb": None, "command": " ".join(cmd),
           "cache": "a fresh process per run; its own prompts, not shared between sequences",
           "prompt_tokens_per_run": n * npp, "cached_tokens_per_run": 0.0}
    print(f"llama.cpp N={n:<4d} {res['tok_per_s']:8.1f} tok/s (decode only {res['decode_tok_per_s']:.1f})", flush=True)
    return res


def measure(system: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", system, "--batch", str(n), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats)] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "MLX_LOOM_NATIVE_DECODE": "0" if system == "mlx-loom-ops" else "1",
           "MLX_LOOM_GENERIC_FORWARD": "1" if system == "mlx-loom-generic" else "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{system} N={n} failed:\n{out.stderr[-3000:]}")
    res = json.loads(line[7:])
    t = median(res["times_s"])
    res.update(system=system, batch=n, median_s=t, tok_per_s=n * args.new_tokens / t)
    print(f"{system:9s} N={n:<4d} {res['tok_per_s']:8.1f} tok/s  peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    return res


def report(rows: list[dict], args) -> str:
    by = {(r["system"], r["batch"]): r for r in rows}
    systems = [s for s in args.systems if any(r["system"] == s for r in rows)]
    ratio_to = [s for s in systems if s != "mlx-loom"]
    loom_systems = [s for s in systems if s.startswith("mlx-loom")]
    # the model-generic path against the peer too (the architectures issue's target)
    pairs = [("mlx-loom-generic", "mlx-lm")] if {"mlx-loom-generic", "mlx-lm"} <= set(systems) else []
    head = ["N"] + [f"{s} tok/s" for s in systems] + [f"mlx-loom / {s}" for s in ratio_to] + \
        [f"{a} / {b}" for a, b in pairs] + \
        [f"{s} peak RSS MB" for s in systems if s != "llama.cpp"] + \
        [f"{s} prompt tokens / request" for s in systems] + \
        [f"{s} prompt tokens from cache" for s in loom_systems]
    lines = [
        "# bench_engine: offline throughput, mlx-loom EngineCore vs mlx-lm BatchGenerator and llama.cpp",
        "",
        f"Model: {args.model or 'default SmolLM2-135M-Instruct (GGUF Q4_1)'}; mlx-loom: weights as loaded by "
        "default (4/8-bit on the native CPU kernels when built, fused native decode layer); mlx-loom-ops: same "
        "weights and kernels, layers as separate MLX ops (before the fused layer); mlx-loom-generic: the model's own "
        "mlx-lm code over the paged pools, no specialization (its quantized layers, RMSNorms, RoPEs and SiLU-gated MLPs run as "
        "native-kernel subclasses the loader switches them to, each checked equal); mlx-loom-f32 and mlx-lm: dequantized to "
        f"float32 through OpenBLAS (mlx-lm on MLX's and mlx-lm's own modules); llama.cpp: llama-batched-bench on the GGUF. {args.new_tokens} greedy new "
        f"tokens per request (EOS ignored), varied chat prompts (llama.cpp: prompts of the same mean length, "
        f"its own tokens); tok/s = N x {args.new_tokens} / (prefill + decode time); median of {args.repeats} runs "
        "after a warm-up; each cell its own process.",
        "",
        "Cache state: every run (warm-up and each timed run) sends prompts no earlier run sent; they share "
        "only the chat template and one system prompt, as real chats do. mlx-loom keeps prefix caching on "
        "(its default: the full 16-token blocks of that shared start come from the cache, the share is in "
        "the last columns); mlx-lm's BatchGenerator has no prefix cache and is new per run; llama.cpp is a "
        "fresh process per run.",
        f"Backend: {next((r['backend'] for r in rows if r.get('backend')), '?')}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for n in args.batch:
        loom = by.get(("mlx-loom", n))
        cells = [str(n)] + [f"{by[(s, n)]['tok_per_s']:.1f}" if (s, n) in by else "-" for s in systems]
        cells += [f"{loom['tok_per_s'] / by[(s, n)]['tok_per_s']:.2f}x" if loom and (s, n) in by else "-"
                  for s in ratio_to]
        cells += [f"{by[(a, n)]['tok_per_s'] / by[(b, n)]['tok_per_s']:.2f}x" if (a, n) in by and (b, n) in by
                  else "-" for a, b in pairs]
        cells += [f"{by[(s, n)]['peak_rss_mb']:.0f}" if (s, n) in by else "-" for s in systems if s != "llama.cpp"]
        cells += [f"{by[(s, n)]['prompt_tokens_per_run'] / n:.1f}" if (s, n) in by else "-" for s in systems]
        cells += [_cached(by.get((s, n))) for s in loom_systems]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cached(row: dict | None) -> str:
    if not row:
        return "-"
    p, c = row["prompt_tokens_per_run"], row["cached_tokens_per_run"]
    return f"{c:.0f} of {p:.0f} ({100 * c / p:.0f}%)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 100])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="GGUF file or mlx-lm directory (default: embedded model)")
    ap.add_argument("--systems", nargs="+", default=[s for s in SYSTEMS if s != "mlx-loom-generic"],
                    choices=SYSTEMS)
    ap.add_argument("--child", choices=SYSTEMS[:5], dest="system", help=argparse.SUPPRESS)
    ap.add_argument("--llama-prompt-tokens", type=int, default=55, help="prompt length for llama-batched-bench "
                    "when no mlx-loom row of the same N ran first (else the mean length of our prompts)")
    ap.add_argument("--out", default="bench_engine")
    ap.add_argument("--report-from", default=None, metavar="JSON",
                    help="only rewrite the Markdown report of a results JSON this script wrote")
    args = ap.parse_args()
    if args.system:
        return child(args)
    if args.report_from:
        data = json.loads(Path(args.report_from).read_text())
        md = report(data["rows"], argparse.Namespace(**data["args"]))
        Path(args.report_from).with_suffix(".md").write_text(md)
        return print(md)
    rows: list[dict] = []
    for n in args.batch:
        for s in args.systems:
            row = measure_llama(n, args, rows) if s == "llama.cpp" else measure(s, n, args)
            if row is not None:
                rows.append(row)
    md = report(rows, args)
    js, mdp = write_results(args.out, {"machine": machine(), "args": vars(args), "rows": rows}, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
