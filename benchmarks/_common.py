"""Shared helpers for benchmarks: prompts, timing, RSS, result files."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
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


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """n varied chat prompts (lengths differ by question and by a numbered suffix)."""
    prompts = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        if i >= len(QUESTIONS):
            q = f"{q} (variant {i}: answer in at most {3 + i % 5} sentences)"
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        prompts.append(tokenizer.encode(text))
    return prompts


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


def run_batch(core, prompts, params, tag: str) -> float:
    """Seconds for an EngineCore to finish every prompt, each making exactly params.max_tokens."""
    from mlx_loom.scheduler.messages import AddRequest

    for i, p in enumerate(prompts):
        core.add(AddRequest(f"{tag}-{i}", tuple(p), params))
    t0 = time.perf_counter()
    produced = 0
    while core.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in core.step())
    dt = time.perf_counter() - t0
    assert produced == len(prompts) * params.max_tokens, (produced, len(prompts) * params.max_tokens)
    return dt
