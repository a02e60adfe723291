"""Speculative decoding inside the continuous batch (ML-SpecQD).

speculator (the engine's hook between schedule and step), drafter (draft levels: a draft model's
own paged KV, n-gram sub-proposals), draft_model and draft_scaling (microscaling self-drafts with
activation-aware scaling, or a separate same-tokenizer model), controller (cost model: how many
tokens to draft), acceptance (greedy prefix accept, rejection sampling), probs (the sampler's
rules as distributions), ngram (prompt lookup). Everything but controller, acceptance and ngram
imports mlx.
"""

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before any mlx import)
