"""Offline acceptance of ML-SpecQD drafts on the default model (issue 7), and their cost on this CPU.

For each of --prompts chat prompts the target greedily generates --new-tokens tokens (plain mlx-lm
forward with mlx-lm's KV cache). Over prompt + continuation, teacher-forced:
  (a) top-1 agreement of each self-draft kind (mlx_loom/spec/draft_model.py, with the activation-aware
      scaling of mlx_loom/spec/draft_scaling.py as the engine builds it) with that continuation, and of
      the plain casts without scaling;
  (b) greedy speculation simulated exactly for k in --k, as tokens per target forward
      (= accepted + 1 per verification, the last step capped by the token budget):
        - draft:        the MXFP4 draft proposes its own k greedy tokens from the true prefix;
        - ngram:        mlx_loom/spec/ngram.py proposes k tokens straight to the target;
        - 2-level:      ML-SpecQD: the draft produces the same k tokens, but drafts them with the
                        n-gram proposer as its own level 2 (greedy verification by the draft), so the
                        target sees what it sees with `draft`; reported: draft forwards per
                        target forward and tokens per draft forward;
        - 2-level-1pass: the n-gram proposes k, one draft forward verifies them greedily (its
                        accepted prefix plus its own next token, at most k) and that goes to the target;
  (c) wall time of one forward at batch 1 with the KV cache (median of --repeats): target and each
      draft for 1..5 new tokens after a prompt + continuation context, and the n-gram proposer on
      2k-token rows. A modelled speedup per k: tokens per target forward / (cost of the step's
      draft forwards + one verification of k+1 tokens, in target decode forwards).
  (d) the scaling strength sweep: MXFP4 drafts for each alpha in --alphas and calibration length in
      --calibration, scored by teacher-forced agreement with the target on held-out calibration
      text (tokens 4096-6143 of mlx_loom/kernels/calibration.py's text; the statistics use its first
      tokens), which is how draft_scaling.ALPHAS and CALIBRATION_TOKENS were chosen, and on the
      chat continuations of (a) for reference.
MLX's CPU quantized matmul (what a plain mlx-lm forward of these 4-bit / MX modules runs) takes
~150 ms a token for this model, so (a) and (b) evaluate each model through a float32 twin: the same
module tree with every quantized weight dequantized (identical values, float32 BLAS). A fidelity
check reruns the real quantized target and MXFP4 draft on --fidelity prompts and reports how often
they agree with their twins. Costs (c) are the real quantized modules.

    .venv/bin/python benchmarks/bench_spec_acceptance.py [--prompts 10] [--new-tokens 64] [--k 1 2 4]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_loom.kernels  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_map  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache  # noqa: E402

from _common import chat_prompts, machine, median, write_results  # noqa: E402
from mlx_loom.kernels.calibration import calibration_tokens  # noqa: E402
from mlx_loom.spec import draft_scaling# noqa: E402
from mlx_loom.spec.draft_model import DRAFT_KINDS, build_draft_model  # noqa: E402
from mlx_loom.spec.draft_scaling import input_means  # noqa: E402
from mlx_loom.models.loader import describe_backend, load_model  # noqa: E402
from mlx_loom.spec.ngram import NgramProposer  # noqa: E402

NGRAM = NgramProposer(1, 4)


@dataclass
class Row:
    """One prompt: seq = prompt + continuation; the continuation starts at `start`."""
    seq: list[int]
    start: int
    draft_argmax: dict  # kind -> np.ndarray [L]: teacher-forced next-token argmax of that draft


@dataclass
class Sim:
    tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    draft_tokens: int = 0  # tokens the draft produced (2-level: for its n-gram level)

    def add(self, other: "Sim") -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)


# -- models --

def float32_twin(model: nn.Module, memo: dict) -> nn.Module:
    """A new model of the same class: quantized leaves dequantized to float32, shared leaves shared."""
    twin = type(model)(model.args)
    twin.update_modules(tree_map(lambda m: _twin_leaf(m, memo), model.leaf_modules(), is_leaf=nn.Module.is_module))
    mx.eval(twin.parameters())
    return twin


def _twin_leaf(module: nn.Module, memo: dict) -> nn.Module:
    """memo: id -> (module, twin); holding the module keeps its id from being reused."""
    if id(module) not in memo:
        memo[id(module)] = (module, _dequantized(module))
    return memo[id(module)][1]


def _dequantized(module: nn.Module) -> nn.Module:
    if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return module
    w = mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                      bits=module.bits, mode=module.mode, dtype=mx.float32)  # [O, I]
    if isinstance(module, nn.QuantizedEmbedding):
        out = nn.Embedding(*w.shape)
    else:
        out = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
        if "bias" in module:
            out.bias = module.bias
    out.weight = w
    return out


def greedy_generate(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)  # [1, L, V]
    out = [int(mx.argmax(logits[0, -1]).item())]
    while len(out) < n:
        logits = model(mx.array([[out[-1]]]), cache=cache)
        out.append(int(mx.argmax(logits[0, -1]).item()))
    return out


def teacher_forced_argmax(model: nn.Module, seq: list[int]) -> np.ndarray:
    """[L]: argmax of the next token after each prefix seq[:t+1]."""
    logits = model(mx.array([seq]))  # [1, L, V]
    return np.array(mx.argmax(logits[0], axis=-1))


class DraftRunner:
    """The draft's own greedy tokens from a true prefix, with a KV cache trimmed back after each run."""

    def __init__(self, model: nn.Module, seq: list[int]):
        self.model, self.seq = model, seq
        self.cache = make_prompt_cache(model)
        self.cached = 0  # the cache holds seq[:cached]

    def greedy(self, c: int, k: int) -> list[int]:
        logits = self.model(mx.array([self.seq[self.cached:c]]), cache=self.cache)
        out = [int(mx.argmax(logits[0, -1]).item())]
        while len(out) < k:
            logits = self.model(mx.array([[out[-1]]]), cache=self.cache)
            out.append(int(mx.argmax(logits[0, -1]).item()))
        trim_prompt_cache(self.cache, k - 1)
        self.cached = c
        return out


# -- simulation --

def matched(proposal: list[int], truth: list[int]) -> int:
    n = 0
    while n < len(proposal) and n < len(truth) and proposal[n] == truth[n]:
        n += 1
    return n


def level2_forwards(context: list[int], drafts: list[int]) -> int:
    """Draft forwards to produce `drafts` greedily when the n-gram proposer drafts for the draft."""
    j = forwards = 0
    while j < len(drafts):
        guess = NGRAM.propose(context + drafts[:j], len(drafts) - j - 1)
        j += matched(guess, drafts[j:]) + 1
        forwards += 1
    return forwards


def one_pass_proposal(row: Row, c: int, k: int) -> list[int]:
    """n-gram guesses, verified by one greedy draft forward: the accepted guesses + the draft's token.

    Stops once the output leaves the true sequence (the target rejects there anyway), so the
    draft's teacher-forced argmax is its exact output."""
    guess, out = NGRAM.propose(row.seq[:c], k), []
    draft_argmax = row.draft_argmax["mxfp4"]
    for i in range(k):
        token = int(draft_argmax[c - 1 + i])
        accepted = i < len(guess) and guess[i] == token
        out.append(token)
        if not accepted or token != row.seq[c + i]:
            break
    return out


def simulate(row: Row, n: int, k: int, draft: DraftRunner) -> dict:
    """Simulated verification steps over one prompt's continuation, per method."""
    sims = {"draft": Sim(), "2-level": Sim()}
    c, end = row.start, row.start + n
    while c < end:  # draft and 2-level: the same k draft tokens, hence the same target steps
        kk = min(k, end - c - 1)  # the last step's bonus token ends the budget
        drafts = draft.greedy(c, kk) if kk else []
        step = Sim(tokens=matched(drafts, row.seq[c:end]) + 1, target_forwards=1, draft_tokens=kk)
        sims["draft"].add(replace(step, draft_forwards=kk))
        sims["2-level"].add(replace(step, draft_forwards=level2_forwards(row.seq[:c], drafts)))
        c += step.tokens
    sims["ngram"] = _run(row, n, k, lambda c, kk: NGRAM.propose(row.seq[:c], kk), uses_draft=False)
    sims["2-level-1pass"] = _run(row, n, k, lambda c, kk: one_pass_proposal(row, c, kk), uses_draft=True)
    return sims


def _run(row: Row, n: int, k: int, propose, uses_draft: bool) -> Sim:
    """Greedy verification steps of proposals propose(c, k) over one continuation."""
    sim = Sim()
    c, end = row.start, row.start + n
    while c < end:
        kk = min(k, end - c - 1)
        accepted = matched(propose(c, kk), row.seq[c:end])
        sim.add(Sim(tokens=accepted + 1, target_forwards=1, draft_forwards=int(uses_draft and kk > 0)))
        c += accepted + 1
    return sim


def acceptance(rows: list[Row], draft_twin: nn.Module, n: int, ks: list[int]) -> dict:
    out = {}
    for k in ks:
        total = {}
        for row in rows:
            for name, sim in simulate(row, n, k, DraftRunner(draft_twin, row.seq)).items():
                total.setdefault(name, Sim()).add(sim)
        out[k] = {name: _summary(sim) for name, sim in total.items()}
        print(f"k={k}: " + ", ".join(f"{m} {s['tokens_per_target_forward']:.2f}" for m, s in out[k].items()), flush=True)
    return out


def _summary(sim: Sim) -> dict:
    return {**asdict(sim), "tokens_per_target_forward": sim.tokens / sim.target_forwards,
            "draft_forwards_per_target_forward": sim.draft_forwards / sim.target_forwards,
            "tokens_per_draft_forward": sim.draft_tokens / sim.draft_forwards if sim.draft_tokens else None}


def agreement(rows: list[Row], n: int) -> dict:
    """kind -> fraction of continuation tokens equal to the draft's teacher-forced argmax."""
    out = {}
    for kind in rows[0].draft_argmax:
        hits = sum(int((row.draft_argmax[kind][row.start - 1:row.start - 1 + n]
                        == np.array(row.seq[row.start:row.start + n])).sum()) for row in rows)
        out[kind] = hits / (n * len(rows))
    return out


# -- costs --

def forward_ms(model: nn.Module, context: list[int], new: int, repeats: int) -> float:
    """Median ms of one forward of `new` tokens after `context` in the KV cache (trimmed back each time)."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([context]), cache=cache))
    x = mx.array([context[-new:]])
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        mx.eval(model(x, cache=cache))
        if i:  # the first is a warm-up
            times.append((time.perf_counter() - t0) * 1e3)
        trim_prompt_cache(cache, new)
    return median(times)


def costs(models: dict, context: list[int], repeats: int) -> dict:
    out = {}
    for name, model in models.items():
        out[name] = {t: forward_ms(model, context, t, repeats) for t in (1, 2, 3, 4, 5)}
        print(f"cost {name}: " + ", ".join(f"{t} tok {ms:.1f} ms" for t, ms in out[name].items()), flush=True)
    return out


def ngram_cost_us(tokens: list[int], repeats: int = 400) -> dict:
    """propose(prefix, 4) on prefixes of 2000-2400 tokens of real text: median and p99 microseconds."""
    rng = random.Random(0)
    prefixes = [tokens[:rng.randrange(2000, 2400)] for _ in range(repeats)]
    times = []
    for prefix in prefixes:
        t0 = time.perf_counter()
        NGRAM.propose(prefix, 4)
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return {"median_us": statistics.median(times), "p99_us": times[int(0.99 * len(times))]}


def speedups(acc: dict, cost: dict, ks: list[int]) -> dict:
    """Modelled speedup on this CPU: tokens per target forward / step cost in target decode forwards."""
    t1, target = cost["target"][1], cost["target"]
    out = {}
    for k in ks:
        verify = target[k + 1]
        a = acc[k]
        out[k] = {
            "draft": a["draft"]["tokens_per_target_forward"] * t1 / (k * cost["mxfp4"][1] + verify),
            "ngram": a["ngram"]["tokens_per_target_forward"] * t1 / verify,
            # each level-2 draft forward reads at most k tokens: cost it as a k-token draft forward
            "2-level": a["2-level"]["tokens_per_target_forward"] * t1
            / (a["2-level"]["draft_forwards_per_target_forward"] * cost["mxfp4"][k] + verify),
            "2-level-1pass": a["2-level-1pass"]["tokens_per_target_forward"] * t1 / (cost["mxfp4"][k + 1] + verify),
        }
    return out


# -- fidelity of the float32 twins --

def fidelity(target: nn.Module, draft: nn.Module, rows: list[Row], n: int) -> dict:
    """Real quantized modules vs their twins on a few prompts: continuation and draft argmax agreement."""
    same_tokens = same_argmax = total = 0
    for row in rows:
        cont = greedy_generate(target, row.seq[:row.start], n)
        same_tokens += matched(cont, row.seq[row.start:])
        real = teacher_forced_argmax(draft, row.seq)
        same_argmax += int((real == row.draft_argmax["mxfp4"]).sum())
        total += len(row.seq)
    return {"prompts": len(rows), "target_continuation_prefix_identical": same_tokens / (n * len(rows)),
            "draft_argmax_identical": same_argmax / total}


# -- scaling strength --

HELD_OUT_SKIP, HELD_OUT_TOKENS = 4096, 2048


def scaling_sweep(target: nn.Module, target_twin: nn.Module, memo: dict, tokenizer, rows: list[Row], n: int,
                  kinds: list[str], alphas: list[float], lengths: list[int]) -> list[dict]:
    """Agreement per (kind, calibration tokens, alpha): on held-out calibration text and on the chat rows.
    memo: the target twin's (shared leaves are not dequantized again; each draft's own stay out of it)."""
    held = calibration_tokens(tokenizer, HELD_OUT_TOKENS, skip=HELD_OUT_SKIP)
    held_chunks = [held[i:i + 512] for i in range(0, len(held), 512)]
    truth = [teacher_forced_argmax(target_twin, c) for c in held_chunks]
    configs = [(kind, draft_scaling.CALIBRATION_TOKENS, a) for kind in kinds for a in alphas]
    configs += [("mxfp4", length, draft_scaling.ALPHAS["mxfp4"]) for length in lengths
                if length != draft_scaling.CALIBRATION_TOKENS]
    means = {}
    out = []
    for kind, length, alpha in configs:
        if length not in means:
            means[length] = input_means(target, draft_scaling.calibration_chunks(tokenizer, length))
        scales = draft_scaling.scales_from_means(means[length], alpha)
        twin = float32_twin(build_draft_model(target, kind, scales), dict(memo))
        held_hits = sum(int((teacher_forced_argmax(twin, c) == t).sum()) for c, t in zip(held_chunks, truth))
        chat_rows = [replace(r, draft_argmax={kind: teacher_forced_argmax(twin, r.seq)}) for r in rows]
        out.append({"kind": kind, "calibration_tokens": length, "alpha": alpha,
                    "held_out_agreement": held_hits / len(held), "chat_agreement": agreement(chat_rows, n)[kind]})
        print(f"scaling sweep: {out[-1]}", flush=True)
    return out


# -- report --

def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [
        "# bench_spec_acceptance: ML-SpecQD self-draft acceptance and cost on the default model",
        "",
        f"Model: {m['model']} (GGUF Q4_1: 4-bit affine linears, tied 8-bit embedding as lm_head). "
        f"{m['prompts']} chat prompts, {m['new_tokens']} greedy tokens each. Drafts: the target's q/k/v/o and "
        "gate/up/down cast to each kind (mlx_loom/spec/draft_model.py), embedding / final norm / lm_head shared, "
        "per-layer norms the draft's own scaled copies. "
        "Acceptance is evaluated through float32 twins of the quantized modules (same weight values); "
        "costs are plain mlx-lm forwards of the real quantized modules at batch 1 with the KV cache.",
        f"Backend: {m['backend']}",
        "",
        "## Top-1 agreement with the target's greedy continuation (teacher-forced)",
        "",
        "| draft | agreement | target |",
        "|---|---|---|",
    ]
    lines += [f"| {kind} | {a:.3f} | {'>= 0.70' if kind == 'mxfp4' else ''} |" for kind, a in res["agreement"].items()]
    lines += ["", f"The drafts are built as the engine builds them: activation-aware scaling (alpha "
              f"{m['alphas']}, {m['calibration_tokens']} calibration tokens, mlx_loom/spec/draft_scaling.py); "
              "'plain cast' is the same cast without it (alpha 0).", "",
              "## Scaling strength per kind (chosen by the held-out calibration text column)", "",
              "| kind | calibration tokens | alpha | agreement on held-out calibration text | "
              "agreement on the chat continuations |", "|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['calibration_tokens']} | {r['alpha']} | {r['held_out_agreement']:.3f} | "
              f"{r['chat_agreement']:.3f} |" for r in res["scaling_sweep"]]
    lines += ["", "alpha 0 is the plain cast. Held-out text: tokens "
              f"{HELD_OUT_SKIP}-{HELD_OUT_SKIP + HELD_OUT_TOKENS - 1} of the calibration text (the statistics come "
              "from its first tokens), teacher-forced argmax of the draft against the target's."]
    lines += ["", "## Greedy speculation, simulated exactly", "",
              "| k | method | tokens / target forward | draft forwards / target forward | tokens / draft forward "
              "| modelled speedup on this CPU |", "|---|---|---|---|---|---|"]
    for k, methods in res["acceptance"].items():
        for name, s in methods.items():
            tpd = "" if s["tokens_per_draft_forward"] is None else f"{s['tokens_per_draft_forward']:.2f}"
            lines.append(f"| {k} | {name} | {s['tokens_per_target_forward']:.2f} | "
                         f"{s['draft_forwards_per_target_forward']:.2f} | {tpd} | {res['speedup'][k][name]:.2f}x |")
    lines += ["", "Target: >= 2.6 tokens per target forward at k=4 (draft: the MXFP4 draft). Modelled speedup = tokens per target "
              "forward x target 1-token cost / (draft forwards x draft cost + target (k+1)-token cost); a 2-level "
              "draft forward is costed as a k-token draft forward (an upper bound).", "",
              "## Forward cost at batch 1 (ms, median), context = prompt + continuation", "",
              "| model | 1 token | 2 tokens | 3 tokens | 4 tokens | 5 tokens | 1 token / target 1 token |",
              "|---|---|---|---|---|---|---|"]
    t1 = res["cost"]["target"][1]
    for name, c in res["cost"].items():
        lines.append(f"| {name} | " + " | ".join(f"{c[t]:.1f}" for t in (1, 2, 3, 4, 5)) + f" | {c[1] / t1:.2f} |")
    ng, fid = res["ngram_cost"], res["fidelity"]
    lines += ["", f"n-gram proposer on 2000-2400-token rows of real text: median {ng['median_us']:.1f} us, "
              f"p99 {ng['p99_us']:.1f} us per propose().", "",
              f"Fidelity of the float32 twins ({fid['prompts']} prompts): the real quantized target's greedy "
              f"continuation matches for the first {fid['target_continuation_prefix_identical']:.3f} of the tokens; "
              f"the real MXFP4 draft's teacher-forced argmax equals its twin's at {fid['draft_argmax_identical']:.3f} "
              "of positions.", ""]
    return "\n".join(lines)


# -- main --

def build_rows(target_twin: nn.Module, draft_twins: dict, prompts: list[list[int]], n: int) -> list[Row]:
    rows = []
    for i, prompt in enumerate(prompts):
        seq = prompt + greedy_generate(target_twin, prompt, n)
        rows.append(Row(seq, len(prompt), {kind: teacher_forced_argmax(m, seq) for kind, m in draft_twins.items()}))
        print(f"prompt {i}: {len(prompt)} + {n} tokens", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=11, help="timed forwards per cost cell")
    ap.add_argument("--fidelity", type=int, default=2, help="prompts rerun on the real quantized modules")
    ap.add_argument("--sweep-kinds", nargs="+", default=list(DRAFT_KINDS))
    ap.add_argument("--alphas", type=float, nargs="+", default=[0, 0.125, 0.25, 0.375, 0.5, 0.75])
    ap.add_argument("--calibration", type=int, nargs="+", default=[512, 1024, 2048],
                    help="calibration lengths (tokens) swept at the shipped alpha")
    ap.add_argument("--name", default="bench_spec_acceptance", help="result file stem under benchmarks/results/")
    args = ap.parse_args()
    loaded = load_model(None)
    target = loaded.model
    t0 = time.perf_counter()
    means = draft_scaling.input_means(target, draft_scaling.calibration_chunks(loaded.tokenizer))
    scaling_s = time.perf_counter() - t0
    drafts = {kind: build_draft_model(target, kind, draft_scaling.scales_from_means(means, draft_scaling.ALPHAS[kind]))
              for kind in DRAFT_KINDS}
    plain = {f"{kind} plain cast": build_draft_model(target, kind) for kind in DRAFT_KINDS if draft_scaling.ALPHAS[kind]}
    memo: dict = {}
    target_twin = float32_twin(target, memo)
    draft_twins = {kind: float32_twin(d, memo) for kind, d in {**drafts, **plain}.items()}
    prompts = chat_prompts(loaded.tokenizer, args.prompts)
    rows = build_rows(target_twin, draft_twins, prompts, args.new_tokens)
    res = {"meta": {"model": loaded.name, "prompts": args.prompts, "new_tokens": args.new_tokens, "k": args.k,
                    "backend": describe_backend(), "machine": machine(), "repeats": args.repeats,
                    "alphas": draft_scaling.ALPHAS, "calibration_tokens": draft_scaling.CALIBRATION_TOKENS,
                    "scaling_statistics_s": scaling_s}}
    res["agreement"] = agreement(rows, args.new_tokens)
    print("agreement", res["agreement"], flush=True)
    res["acceptance"] = acceptance(rows, draft_twins["mxfp4"], args.new_tokens, args.k)
    res["scaling_sweep"] = scaling_sweep(target, target_twin, memo, loaded.tokenizer, rows, args.new_tokens,
                                         args.sweep_kinds, args.alphas, args.calibration)
    text = loaded.tokenizer.encode(Path(__file__).resolve().parents[1].joinpath("docs/ARCHITECTURE.md").read_text())
    res["ngram_cost"] = ngram_cost_us(text)
    res["cost"] = costs({"target": target, **drafts, "target (float32 twin, BLAS)": target_twin}, rows[0].seq,
                        args.repeats)
    res["speedup"] = speedups(res["acceptance"], res["cost"], args.k)
    res["fidelity"] = fidelity(target, drafts["mxfp4"], rows[:args.fidelity], args.new_tokens)
    res["rows"] = [{"prompt_tokens": r.start, "continuation": r.seq[r.start:]} for r in rows]
    md = markdown(res)
    js, mdp = write_results(args.name, res, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
