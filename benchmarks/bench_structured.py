"""Structured output cost: constrained vs unconstrained engine throughput, mask cost, compile time.

One process, the default model. For each batch size N, N requests run free (EOS ignored) and N
run under a JSON schema whose document cannot finish within --new-tokens (a string field with
a large minLength), so both sides generate exactly N * new_tokens tokens and the only
difference is the grammar work: mask fill (llguidance, batched), mask apply (one MLX op) and
matcher advance. Prefix caching is off so neither side benefits from the other's run.

    .venv/bin/python benchmarks/bench_structured.py               # N = 1 32 100
    .venv/bin/python benchmarks/bench_structured.py --batch 32 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import chat_prompts, machine, median, peak_rss_mb, run_batch, write_results  # noqa: E402

LONG_DOC = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
            "required": ["story"], "additionalProperties": False}


class Timer:
    """Wall time spent inside wrapped methods (the engine thread is this thread)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def measure_n(loaded, n: int, args) -> dict:
    from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.sched.params import SamplingParams
    from mlx_loom.schemas.grammar import GrammarSpec

    runs = [chat_prompts(loaded.tokenizer, n, r) for r in range(2 * args.repeats + 2)]  # new prompts per run
    blocks = n * (-(-(max(len(p) for prompts in runs for p in prompts) + args.new_tokens) // 16)) + 16
    core = EngineCore(EngineConfig(cache=CacheConfig(num_blocks=blocks, enable_prefix_caching=False),
                                   scheduler=SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=max(512, n))),
                      loaded)
    grammar = core.info.grammar.compile(GrammarSpec.json_schema(LONG_DOC))
    free = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, grammar=grammar)
    masks, advance = Timer(), Timer()
    core.structured.apply_masks = masks.wrap(core.structured.apply_masks)
    core.structured.advance = advance.wrap(core.structured.advance)
    run_batch(core, runs[0], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), "warm-free")
    run_batch(core, runs[1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, grammar=grammar),
              "warm-json")
    times = {"unconstrained": [], "constrained": []}
    grammar_s = []
    for r in range(args.repeats):  # interleaved so drift hits both sides alike
        times["unconstrained"].append(run_batch(core, runs[2 + 2 * r], free, f"free{r}").seconds)
        masks.seconds = advance.seconds = 0.0
        times["constrained"].append(run_batch(core, runs[3 + 2 * r], constrained, f"json{r}").seconds)
        grammar_s.append(masks.seconds + advance.seconds)
    tokens = n * args.new_tokens
    free_tps = tokens / median(times["unconstrained"])
    json_tps = tokens / median(times["constrained"])
    row = {"batch": n, "unconstrained_tok_s": free_tps, "constrained_tok_s": json_tps,
           "ratio": json_tps / free_tps, "times_s": times,
           "grammar_us_per_token_row": median(grammar_s) / tokens * 1e6,
           "grammar_share": median(grammar_s) / median(times["constrained"]),
           "prompt_tokens_per_request": sum(len(p) for prompts in runs[2:] for p in prompts) / (len(runs) - 2) / n}
    print(f"N={n:<4d} free {free_tps:7.1f} tok/s  json {json_tps:7.1f} tok/s  ratio {row['ratio']:.2f}  "
          f"grammar {row['grammar_us_per_token_row']:.0f} us/token/row", flush=True)
    return row


def compile_times(loaded) -> dict:
    from mlx_loom.schemas.grammar import GrammarSpec
    from mlx_loom.schemas.llguidance_backend import LLGuidanceBackend
    from structured_schemas import SCHEMAS

    t0 = time.perf_counter()
    backend = LLGuidanceBackend(loaded.tokenizer, vocab_size=loaded.vocab_size)
    build_ms = (time.perf_counter() - t0) * 1e3
    ms = [backend.compile(GrammarSpec.json_schema(s, name=name)).compile_ms for name, _, s in SCHEMAS]
    return {"tokenizer_view_build_ms": build_ms, "schemas": len(ms), "compile_ms_median": statistics.median(ms),
            "compile_ms_max": max(ms)}


def report(rows: list[dict], comp: dict, args) -> str:
    lines = [
        "# bench_structured: JSON-schema constrained vs unconstrained decoding",
        "",
        f"Default model as loaded by default; {args.new_tokens} greedy tokens per request on both sides "
        f"(constrained: a schema that cannot finish sooner); median of {args.repeats} interleaved runs "
        "after a warm-up. Grammar time = llguidance mask fill + building the mask-apply op + matcher "
        "advance (the apply op itself runs inside the step's evaluation, so it shows in the ratio). "
        "Prefix caching off; new prompts for every run.",
        f"Backend: {args.backend}",
        "",
        "| N | unconstrained tok/s | constrained tok/s | ratio | grammar us / token / row | grammar share of step time "
        "| prompt tokens / request |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['unconstrained_tok_s']:.1f} | {r['constrained_tok_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['grammar_us_per_token_row']:.0f} | {r['grammar_share'] * 100:.1f}% | "
                     f"{r['prompt_tokens_per_request']:.1f} |")
    lines += ["", f"Compile ({comp['schemas']} corpus schemas, cold cache): median {comp['compile_ms_median']:.2f} ms, "
              f"max {comp['compile_ms_max']:.2f} ms; tokenizer view built once per model in "
              f"{comp['tokenizer_view_build_ms']:.0f} ms."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 100])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_structured")
    args = ap.parse_args()
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.models.loader import load_model

    from mlx_loom.models.loader import describe_backend

    loaded = load_model(None)
    args.backend = describe_backend()
    comp = compile_times(loaded)
    rows = [measure_n(loaded, n, args) for n in args.batch]
    md = report(rows, comp, args)
    payload = {"machine": machine(), "args": vars(args), "compile": comp, "rows": rows, "peak_rss_mb": peak_rss_mb()}
    js, mdp = write_results(args.out, payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
