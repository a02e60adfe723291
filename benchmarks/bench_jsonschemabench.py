"""Structured output over real-world schemas: acceptance and validity, strict and best effort.

The JSONSchemaBench development sample (240 schemas, 30 per subset; see its README) in
../shared/jsonschemabench from the repository root, or --data / $MLX_LOOM_JSONSCHEMABENCH. Each
schema is compiled as the server would (json_schema.strict true, then false); every accepted one
generates one greedy document (at most --max-tokens) with the default model through an
EngineCore, and each finished ("stop") document is validated against the original schema with the
server's own check (mlx_loom.server.structured.validation_error). Outputs cut at --max-tokens are
counted, not validated (a prefix is not a document).

    .venv/bin/python benchmarks/bench_jsonschemabench.py                  # ~20 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_jsonschemabench.py --per-subset 5 --max-tokens 48 --out quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, peak_rss_mb, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MLX_LOOM_JSONSCHEMABENCH", REPO.parent / "shared" / "jsonschemabench"))
PROMPT = "Reply with one JSON document for the schema below, nothing else.\nSchema: {hint}"
HINT_CHARS = 300
"""Schema text shown to the model (the grammar enforces the rest): enough to name its first fields."""


def load_sample(data: Path, per_subset: int, subsets: list[str] | None) -> list[tuple[str, str, object]]:
    index = json.loads((data / "index.json").read_text())
    out = []
    for subset, ids in index["ids"].items():
        if subsets and subset not in subsets:
            continue
        out += [(subset, i, json.loads((data / subset / f"{i}.json").read_text())) for i in ids[:per_subset]]
    return out


def compile_all(backend, sample, strict: bool) -> list[dict]:
    from mlx_loom.schemas.grammar import GrammarError, GrammarSpec

    rows = []
    for subset, sid, schema in sample:
        row = {"subset": subset, "id": sid, "strict": strict}
        t0 = time.perf_counter()
        try:
            grammar = backend.compile(GrammarSpec.json_schema(schema, name=sid, strict=strict))
            row.update(accepted=True, relaxed=list(grammar.relaxed), narrowed=list(grammar.narrowed))
            row["grammar"] = grammar
        except GrammarError as exc:
            row.update(accepted=False, refusal=str(exc)[:600])
        row["compile_ms"] = (time.perf_counter() - t0) * 1e3
        rows.append(row)
    return rows


def generate(core, tokenizer, rows: list[dict], sample, max_tokens: int, batch: int) -> None:
    """One greedy document per accepted row, `batch` requests in flight; results written into the rows."""
    from mlx_loom.engine.messages import AddRequest
    from mlx_loom.sched.params import SamplingParams
    from mlx_loom.server.structured import validation_error

    schemas = {(s, i): schema for s, i, schema in sample}
    todo = [r for r in rows if r["accepted"]]
    live: dict[str, dict] = {}
    tokens: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    while todo or live:
        while todo and len(live) < batch:
            row = todo.pop(0)
            rid = f"{'s' if row['strict'] else 'b'}-{row['subset']}-{row['id']}"
            hint = json.dumps(schemas[row["subset"], row["id"]], separators=(",", ":"))[:HINT_CHARS]
            prompt = tokenizer.encode(tokenizer.apply_chat_template(
                [{"role": "user", "content": PROMPT.format(hint=hint)}], add_generation_prompt=True))
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, grammar=row["grammar"])
            rejected = core.add(AddRequest(rid, tuple(prompt), params))
            if rejected is not None:
                row.update(finish_reason="rejected", error=str(rejected)[:300])
                continue
            live[rid], tokens[rid] = row, []
        for out in core.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                row = live.pop(out.request_id)
                ids = tokens.pop(out.request_id)
                text = tokenizer.decode(ids)
                row.update(finish_reason=out.finish_reason, tokens=len(ids), output=text[:400])
                if out.finish_reason == "error":
                    row["error"] = (out.error or "")[:300]
                problem = validation_error(row["grammar"], text, out.finish_reason)
                row["valid"] = None if out.finish_reason != "stop" else problem is None
                if problem:
                    row["validation_error"] = problem[:300]
            if out.finished and len(live) + len(todo) and (len(live) + len(todo)) % 20 == 0:
                print(f"  {len(live) + len(todo)} documents to go, {time.perf_counter() - t0:.0f} s", flush=True)


def reuse(row: dict, strict_rows: list[dict]) -> bool:
    """A best-effort row whose grammar is the strict one's takes the strict document: same prompt,
    same grammar, greedy decoding (only the batch it ran in could differ). True when copied."""
    if row["strict"] or not row["accepted"]:
        return False
    twin = next((r for r in strict_rows if r["subset"] == row["subset"] and r["id"] == row["id"]), None)
    if twin is None or not twin["accepted"] or twin["grammar"].grammar != row["grammar"].grammar:
        return False
    row.update({k: twin[k] for k in ("finish_reason", "tokens", "output", "valid", "validation_error", "error")
                if k in twin}, reused_strict_document=True)
    return True


def summarize(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for key in [*dict.fromkeys(r["subset"] for r in rows), "all"]:
        mine = [r for r in rows if key in ("all", r["subset"])]
        finish = Counter(r.get("finish_reason") for r in mine if r["accepted"])
        stop = [r for r in mine if r.get("finish_reason") == "stop"]
        out[key] = {"schemas": len(mine), "accepted": sum(r["accepted"] for r in mine),
                    "relaxed": sum(1 for r in mine if r.get("relaxed")),
                    "narrowed": sum(1 for r in mine if r.get("narrowed")),
                    "finished": len(stop), "valid": sum(1 for r in stop if r["valid"]),
                    "invalid": sum(1 for r in stop if not r["valid"]),
                    "length": finish.get("length", 0), "error": finish.get("error", 0) + finish.get("rejected", 0)}
    return out


def report(summary: dict[str, dict], args) -> str:
    lines = ["# bench_jsonschemabench: acceptance and validity over the JSONSchemaBench development sample", "",
             f"{summary['strict']['all']['schemas']} schemas ({args.per_subset} per subset) from {args.data_name}; "
             f"one greedy document per accepted schema, at most {args.max_tokens} tokens, default model, "
             f"{args.batch} requests in flight. *Accepted*: compiled (strict: no 400). *Finished*: ended by the "
             "grammar (finish_reason stop); each finished document is validated against the original schema with "
             "jsonschema (formats as annotations), *invalid* counts those that fail. *Cut*: hit max_tokens (not a "
             "document, not validated). *Relaxed*: best effort served it with some keywords not enforced. "
             "*Narrowed*: enforced soundly with fewer documents allowed (uniqueItems: at most one item). "
             "A best-effort schema whose grammar is identical to its strict grammar reuses the strict document "
             f"(same prompt, grammar and greedy decoding; {args.reused} of them).",
             f"Backend: {args.backend}; commit {args.commit}", ""]
    for mode in ("strict", "best_effort"):
        lines += [f"## {'strict: true' if mode == 'strict' else 'strict: false (best effort)'}", "",
                  "| subset | accepted | relaxed | narrowed | finished | valid | invalid | cut | error |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for subset, s in summary[mode].items():
            pct = 100 * s["accepted"] / s["schemas"]
            lines.append(f"| {subset} | {s['accepted']}/{s['schemas']} ({pct:.1f}%) | {s['relaxed']} | "
                         f"{s['narrowed']} | {s['finished']} | {s['valid']} | {s['invalid']} | {s['length']} | "
                         f"{s['error']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the jsonschemabench sample folder")
    ap.add_argument("--per-subset", type=int, default=30)
    ap.add_argument("--subsets", nargs="*")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="bench_jsonschemabench")
    args = ap.parse_args()
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.models.loader import describe_backend, load_model

    sample = load_sample(args.data, args.per_subset, args.subsets)
    args.data_name = args.data.name
    loaded = load_model(None)
    args.backend = describe_backend()
    core = EngineCore(EngineConfig(cache=CacheConfig(num_blocks=args.batch * 48 + 64),
                                   scheduler=SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=2048)),
                      loaded)
    t0 = time.perf_counter()
    rows = {}
    for mode, strict in (("strict", True), ("best_effort", False)):
        rows[mode] = compile_all(core.info.grammar, sample, strict)
        print(f"{mode}: {sum(r['accepted'] for r in rows[mode])}/{len(sample)} accepted", flush=True)
        fresh = [r for r in rows[mode] if not reuse(r, rows.get("strict", []))]
        generate(core, loaded.tokenizer, fresh, sample, args.max_tokens, args.batch)
    summary = {mode: summarize(rs) for mode, rs in rows.items()}
    args.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip()
    args.reused = sum(1 for r in rows["best_effort"] if r.get("reused_strict_document"))
    md = report(summary, args)
    for rs in rows.values():
        for r in rs:
            r.pop("grammar", None)
    payload = {"machine": machine(), "backend": args.backend, "commit": args.commit,
               "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "rows": rows,
               "wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    js, mdp = write_results(args.out, payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
