"""The sampling distribution of a row as numpy probabilities, for speculative verification.

Mirrors mlx_loom/sample/sampler.py's rules for the parameters speculation accepts (rows with
penalties or logprobs are never speculated): logit_bias added, then temperature, top_k, top_p
(the smallest set whose mass reaches top_p of the top-k mass; the top token always stays) and
min_p (p < min_p * p_max dropped), renormalized. Rejection sampling is only distribution-exact
when p is the distribution the plain sampler draws from, so these rules must stay in step.
"""

from __future__ import annotations

import numpy as np

from mlx_loom.sample.sampler import GREEDY_EPS
from mlx_loom.sched.params import SamplingParams


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_EPS or params.top_k == 1


def biased(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """logits [L, V] plus the request's logit_bias (a copy when there is any)."""
    if not params.logit_bias:
        return logits
    x = np.array(logits, dtype=np.float32)
    for token, bias in params.logit_bias:
        if 0 <= token < x.shape[-1]:
            x[:, token] += bias
    return x


def processed_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """logits [L, V] (masked, -inf allowed) -> probabilities [L, V] float64, rows summing to 1."""
    x = biased(logits, params).astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x / params.temperature)  # [L, V], 1.0 at each row's top token
    vocab = p.shape[-1]
    k = params.top_k if 0 < params.top_k < vocab else 0
    if k or params.top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")  # [L, V] best first
        ps = np.take_along_axis(p, order, axis=-1)
        if k:
            ps[:, k:] = 0.0
        c = np.cumsum(ps, axis=-1)
        before = c - ps
        if params.top_p < 1.0:  # the top token always stays (as in the sampler)
            ps = ps * ((before < params.top_p * c[:, -1:]) | (np.arange(vocab) == 0))
        p = np.zeros_like(p)
        np.put_along_axis(p, order, ps, axis=-1)
    if params.min_p > 0.0:
        p = p * (p >= params.min_p)
    return p / p.sum(axis=-1, keepdims=True)
