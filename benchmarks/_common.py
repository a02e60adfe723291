"""Shared helpers for benchmarks: prompts, timing, RSS, result files."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a ten-year-old in a few sentences.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes, with quantities for two people and a tip for flipping them.",
    "What is 17 times 23?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Name a famous painter from the Netherlands and one of their works.",
    "How do I reverse a list in Python? Show an example and explain when a copy is made.",
    "Translate 'good morning' into Spanish, French and German.",
    "What are the three states of matter?",
]


SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and briefly."
"""Shared by every request, as real chats share a system prompt (an explicit one also keeps each
server's template from adding its own default)."""


def chat_messages(index: int, run: int = 0) -> list[dict]:
    """The index-th prompt of a run: the system prompt, then a question with a request number that
    is new for every (run, index), so no run reuses an earlier run's prompts beyond what real chats
    share (the template and the system prompt): every system gets the same cold cache state."""
    q = QUESTIONS[index % len(QUESTIONS)]
    if index >= len(QUESTIONS):
        q = f"{q} (answer in at most {3 + index % 5} sentences)"
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Request {run}-{index}. {q}"}]


def chat_prompts(tokenizer, n: int, run: int = 0) -> list[list[int]]:
    """n varied chat prompts of one run, tokenized with the model's chat template (see chat_messages)."""
    return [tokenizer.encode(tokenizer.apply_chat_template(chat_messages(i, run), add_generation_prompt=True))
            for i in range(n)]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict:
    import os

    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def write_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    js.write_text(json.dumps(payload, indent=2) + "\n")
    md.write_text(markdown)
    return js, md


@dataclass(frozen=True)
class BatchRun:
    """One timed batch on an EngineCore, with the cache state it met."""
    seconds: float
    prompt_tokens: int
    cached_tokens: int
    """Prompt tokens served from the prefix cache during this batch."""


def run_batch(core, prompts, params, tag: str) -> BatchRun:
    """An EngineCore finishing every prompt, each making exactly params.max_tokens."""
    from mlx_loom.engine.messages import AddRequest

    hits0 = core.stats().prefix_cache_hits
    for i, p in enumerate(prompts):
        core.add(AddRequest(f"{tag}-{i}", tuple(p), params))
    t0 = time.perf_counter()
    produced = 0
    while core.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in core.step())
    dt = time.perf_counter() - t0
    assert produced == len(prompts) * params.max_tokens, (produced, len(prompts) * params.max_tokens)
    return BatchRun(dt, sum(map(len, prompts)), core.stats().prefix_cache_hits - hits0)


def cache_note(runs: list[BatchRun]) -> dict:
    """Mean prompt and cached tokens per timed run, for the results file."""
    return {"prompt_tokens_per_run": statistics.fmean(r.prompt_tokens for r in runs),
            "cached_tokens_per_run": statistics.fmean(r.cached_tokens for r in runs)}
