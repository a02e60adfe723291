"""Model-level fidelity of sparse prefill (mlx_loom/kernels/sparse_prefill) against dense, on the default model.

1. Whole-model chunked prefill of N tokens of text, dense and sparse in lockstep (same chunks as
   the engine, 512 tokens): next-token agreement (argmax) over positions, mean KL(dense || sparse)
   of the next-token distributions, perplexity of the text under each. Reported over all
   positions and over the positions whose chunk ran sparse (the rest are dense in both).
2. Passkey retrieval: a 5-digit key hidden at depths 10..90% of filler text of 4k and 8k tokens,
   greedy answer after the prefill (decode is dense); sparse must succeed wherever dense does.

Text: the Python language reference shipped with CPython (pydoc_data.topics), tokens after the
ones the pattern search calibrates on (disjoint). The shipped config is
mlx_loom/kernels/patterns/smollm2-135m.json.

    .venv/bin/python benchmarks/sparse_fidelity.py [--length 8192] [--passkey-lengths 4096 8192]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_loom.kernels  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from mlx_loom.kernels.model_prefill import dense_attention, greedy_continue, prefill, sparse_attention  # noqa: E402
from mlx_loom.kernels.sparse_patterns import (SparsePatternConfig, load_config, should_use_sparse,  # noqa: E402
                                     shipped_config_path)

SEARCH_TOKENS = 8192  # the search calibrates on the first 8192 tokens; evaluation text starts after
CHUNK = 512


def _log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _chunk_stats(ld: mx.array, ls: mx.array, targets: mx.array) -> mx.array:
    """ld/ls [C, V] log-probs, targets [C] (-1: none) -> [4]: agree, kl, nll dense, nll sparse sums."""
    agree = (mx.argmax(ld, axis=-1) == mx.argmax(ls, axis=-1)).sum()
    kl = (mx.exp(ld) * (ld - ls)).sum()
    has = targets >= 0
    t = mx.maximum(targets, 0)[:, None]
    nll_d = -(mx.take_along_axis(ld, t, axis=-1)[:, 0] * has).sum()
    nll_s = -(mx.take_along_axis(ls, t, axis=-1)[:, 0] * has).sum()
    return mx.stack([agree.astype(mx.float32), kl, nll_d, nll_s])


def compare_prefill(model, tokens: list[int], config: SparsePatternConfig, chunk: int = CHUNK, **thresholds) -> dict:
    """Dense vs sparse prefill in lockstep -> agreement, KL and perplexities (all / sparse chunks)."""
    import math

    attend = sparse_attention(config, **thresholds)
    sums = {"all": [0.0] * 4 + [0, 0], "sparse": [0.0] * 4 + [0, 0]}  # agree, kl, nll_d, nll_s, n, n_nll
    runs = zip(prefill(model, tokens, chunk, dense_attention), prefill(model, tokens, chunk, attend))
    for (start, hd, rd), (_, hs, rs) in runs:
        C = hd.shape[0]
        nxt = tokens[start + 1 : start + C + 1]
        targets = mx.array(nxt + [-1] * (C - len(nxt)), dtype=mx.int32)
        stats = _chunk_stats(_log_softmax(rd.logits(hd)), _log_softmax(rs.logits(hs)), targets).tolist()
        used = should_use_sparse(start + C, config, q_len=C, **thresholds)
        for key in ("all", "sparse") if used else ("all",):
            s = sums[key]
            sums[key] = [a + b for a, b in zip(s[:4], stats)] + [s[4] + C, s[5] + len(nxt)]
    out = {}
    for key, (agree, kl, nll_d, nll_s, n, n_nll) in sums.items():
        if n == 0:
            continue
        ppl_d, ppl_s = math.exp(nll_d / n_nll), math.exp(nll_s / n_nll)
        out[key] = {"positions": n, "agreement": agree / n, "mean_kl": kl / n, "ppl_dense": ppl_d,
                    "ppl_sparse": ppl_s, "ppl_delta_pct": 100 * (ppl_s / ppl_d - 1)}
    return out


# -- passkey --

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """About `length` tokens: intro, filler with the needle at `depth` of it, the question."""
    needle = tokenizer.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    intro, question, filler = (tokenizer.encode(s) for s in (INTRO, QUESTION, FILLER))
    n_fill = length - len(intro) - len(needle) - len(question)
    body = (filler * (n_fill // len(filler) + 1))[:n_fill]
    at = int(depth * n_fill)
    return list(intro) + body[:at] + list(needle) + body[at:] + list(question)


def answer(model, tokens: list[int], attention, chunk: int = CHUNK, n: int = 8) -> list[int]:
    last = None
    for _, h, runner in prefill(model, tokens, chunk, attention, max_len=len(tokens) + n):
        last = h
    return greedy_continue(runner, last, n)


def passkey(lm, lengths, depths, config: SparsePatternConfig, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            key = rng.randint(10000, 99999)
            ids = passkey_prompt(lm.tokenizer, length, depth, key)
            row = {"length": len(ids), "depth": depth, "key": key}
            for name, att in (("dense", dense_attention), ("sparse", sparse_attention(config))):
                text = lm.tokenizer.decode(answer(lm.model, ids, att))
                row[name] = str(key) in text
                row[f"{name}_text"] = text.strip()
            rows.append(row)
            print(row, flush=True)
    return rows


def _markdown(fid: dict, pk: list[dict], meta: dict) -> str:
    lines = [f"# Sparse prefill fidelity ({meta['model']}, {meta['length']} tokens, chunk {CHUNK})", "",
             f"Config: `{meta['config']}`. Text: {meta['text']}. Machine: {meta['machine']['platform']}.",
             f"Backend: {meta['backend']}", "",
             "| positions | n | agreement | mean KL | ppl dense | ppl sparse | ppl delta |",
             "|---|---|---|---|---|---|---|"]
    for key, m in fid.items():
        lines.append(f"| {key} | {m['positions']} | {100 * m['agreement']:.1f}% | {m['mean_kl']:.4f} | "
                     f"{m['ppl_dense']:.3f} | {m['ppl_sparse']:.3f} | {m['ppl_delta_pct']:+.2f}% |")
    if pk:
        lines += ["", "Passkey retrieval (greedy, 8 tokens after the prompt):", "",
                  "| length | depth | dense | sparse |", "|---|---|---|---|"]
        for r in pk:
            lines.append(f"| {r['length']} | {int(100 * r['depth'])}% | {'ok' if r['dense'] else 'miss'} | "
                         f"{'ok' if r['sparse'] else 'miss'} |")
        bad = [r for r in pk if r["dense"] and not r["sparse"]]
        lines += ["", f"Sparse fails where dense succeeds: {len(bad)} of {sum(r['dense'] for r in pk)}."]
    lines.append(f"\nTotal time {meta['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from _common import machine, write_results
    from mlx_loom.kernels.calibration import calibration_tokens
    from mlx_loom.models.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--config", default=None, help="pattern config (default: the shipped one)")
    ap.add_argument("--passkey-lengths", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--depths", type=float, nargs="*", default=[d / 10 for d in range(1, 10)])
    ap.add_argument("--name", default="sparse_fidelity")
    args = ap.parse_args(argv)
    lm = load_model(None)
    path = args.config or shipped_config_path(lm.name)
    config = load_config(path, lm.num_heads)
    t0 = time.perf_counter()
    fid = compare_prefill(lm.model, calibration_tokens(lm.tokenizer, args.length, skip=SEARCH_TOKENS), config)
    print(fid, flush=True)
    pk = passkey(lm, args.passkey_lengths, args.depths, config)
    from mlx_loom.models.loader import describe_backend

    meta = {"model": lm.name, "length": args.length, "config": str(Path(path).name), "machine": machine(),
            "backend": describe_backend(),
            "text": f"pydoc_data.topics tokens {SEARCH_TOKENS}..{SEARCH_TOKENS + args.length}",
            "seconds": time.perf_counter() - t0}
    js, md = write_results(args.name, {"meta": meta, "fidelity": fid, "passkey": pk}, _markdown(fid, pk, meta))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
