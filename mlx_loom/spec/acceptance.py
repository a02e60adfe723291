"""Verification of drafted tokens: greedy prefix match and speculative (rejection) sampling.

Pure numpy, no mlx: the engine hands over int lists and float32 probability rows. Speculative
sampling follows Leviathan et al. 2023 / Chen et al. 2023: draft token d at position i is kept with
probability min(1, p[i, d] / q[i, d]); the first rejected position samples from the normalized
residual max(0, p[i] - q[i]); when every draft is kept, one bonus token comes from p[k]. Each
emitted token is then distributed exactly as the target's p, whatever q is. A deterministic
proposer (n-gram) is the case q[i] = one-hot(d): accept with probability p[i, d], residual p[i]
with d removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def greedy_accept(draft: Sequence[int], target_argmax: Sequence[int]) -> list[int]:
    """The longest prefix of draft matching target_argmax, then the target's token there (>= 1 token)."""
    if len(target_argmax) != len(draft) + 1:
        raise ValueError(f"need len(target_argmax) == len(draft) + 1, got {len(target_argmax)} and {len(draft)}")
    out = []
    for d, t in zip(draft, target_argmax):
        if d != t:
            break
        out.append(int(t))
    out.append(int(target_argmax[len(out)]))
    return out


def rejection_accept(draft: Sequence[int], q: np.ndarray | None, p: np.ndarray,
                     rng: np.random.Generator) -> list[int]:
    """Accepted drafts plus one token (residual sample or bonus) (>= 1 token).

    p [k+1, V]: target probabilities (processed, rows sum to 1); q [k, V]: the distributions the
    drafts were sampled from, or None for deterministic proposals.
    """
    k = len(draft)
    _check_shapes(k, q, p)
    out = []
    for i, d in enumerate(draft):
        q_row = None if q is None else q[i]
        if rng.random() < accept_probability(p[i], q_row, d):
            out.append(int(d))
            continue
        out.append(sample(residual(p[i], q_row, d), rng))
        return out
    out.append(sample(p[k], rng))
    return out


def accept_probability(p_row: np.ndarray, q_row: np.ndarray | None, d: int) -> float:
    """min(1, p[d] / q[d]); q None means q[d] = 1."""
    q_d = 1.0 if q_row is None else float(q_row[d])
    p_d = float(p_row[d])
    if p_d <= 0.0:  # never keep a token the target cannot emit (even if q[d] were 0)
        return 0.0
    return 1.0 if p_d >= q_d else p_d / q_d


def residual(p_row: np.ndarray, q_row: np.ndarray | None, d: int) -> np.ndarray:
    """[V] unnormalized residual max(0, p - q) (p with d zeroed when q is None); p when it is all zero."""
    if q_row is None:
        res = np.array(p_row, dtype=np.float64)
        res[d] = 0.0
    else:
        res = np.maximum(np.asarray(p_row, dtype=np.float64) - q_row, 0.0)
    return res if res.sum() > 0 else np.asarray(p_row, dtype=np.float64)


def sample(weights: np.ndarray, rng: np.random.Generator) -> int:
    """One index drawn in proportion to the non-negative weights [V] (zero weights never drawn)."""
    cdf = np.cumsum(weights, dtype=np.float64)  # [V]
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return i if i < len(cdf) else int(np.flatnonzero(weights)[-1])  # u * total rounded up to total


def _check_shapes(k: int, q: np.ndarray | None, p: np.ndarray) -> None:
    if p.ndim != 2 or p.shape[0] != k + 1:
        raise ValueError(f"p must be [k+1, V] = [{k + 1}, V], got {p.shape}")
    if q is not None and q.shape != (k, p.shape[1]):
        raise ValueError(f"q must be [k, V] = [{k}, {p.shape[1]}], got {q.shape}")


class PositionCounts:
    """Acceptance by draft position: position i is tried when drafts 0..i-1 were all kept, and kept or
    not. rates()[i] = P(draft i kept | drafts before it kept), the per-token acceptance `a` the
    controller models, measured where it applies. (The share of proposed drafts kept is a different
    number: with a = 0.7 and k = 4 it is (a + a^2 + a^3 + a^4) / 4 = 0.44.)"""

    def __init__(self) -> None:
        self.tried: list[int] = []
        self.kept: list[int] = []

    def record(self, proposed: int, accepted: int) -> None:
        """One verified row: `proposed` drafts, the first `accepted` kept."""
        need = min(proposed, accepted + 1)
        while len(self.tried) < need:
            self.tried.append(0)
            self.kept.append(0)
        for i in range(need):
            self.tried[i] += 1
            self.kept[i] += i < accepted

    def rates(self) -> list[float]:
        return [k / t for k, t in zip(self.kept, self.tried)]
