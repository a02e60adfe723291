"""Greedy verification and speculative sampling (mlx_loom/spec/acceptance.py).

The distribution tests use a Markov "model": the target's next-token distribution given the last
token c is P[c], the draft's is Q[c]. Speculation must emit tokens distributed exactly as sampling
from P one token at a time, whatever Q is (or with a deterministic proposer, q=None).
"""

from functools import lru_cache
from itertools import product

import numpy as np
import pytest

from mlx_loom.spec.acceptance import accept_probability, greedy_accept, rejection_accept, residual, sample


class ScriptedRng:
    """A Generator stand-in whose random() returns the given uniforms in order."""

    def __init__(self, *uniforms: float):
        self.uniforms = list(uniforms)

    def random(self) -> float:
        return self.uniforms.pop(0)


def markov(v: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """P, Q [V, V] row-stochastic; Q differs from P, has zeros where P has mass, and vice versa."""
    rng = np.random.default_rng(seed)
    p, q = rng.dirichlet(np.ones(v), size=v), rng.dirichlet(np.ones(v) * 0.5, size=v)
    p[0, 1], q[1, 2] = 0.0, 0.0
    return p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)


def tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(x, 0.0) - b.get(x, 0.0)) for x in set(a) | set(b))


def exact_target(P: np.ndarray, c: int, t: int) -> dict:
    """Distribution of the next t tokens sampled from P autoregressively after token c."""
    dist = {(): 1.0}
    for _ in range(t):
        dist = {s + (x,): w * P[s[-1] if s else c, x] for s, w in dist.items() for x in range(len(P))}
    return dist


# -- greedy --

@pytest.mark.parametrize("draft, target, expect", [
    ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]),  # all match: drafts + bonus
    ([1, 5, 3], [1, 2, 3, 4], [1, 2]),  # first mismatch at 1: the target's token there
    ([9, 9], [1, 2, 3], [1]),  # none
    ([], [7], [7]),  # nothing drafted
])
def test_greedy_accept(draft, target, expect):
    assert greedy_accept(draft, target) == expect


def test_greedy_accept_needs_one_more_target_token():
    with pytest.raises(ValueError, match="len\\(draft\\) \\+ 1"):
        greedy_accept([1, 2], [1, 2])


# -- rejection sampling: control flow on scripted uniforms --

def test_accepts_all_then_samples_the_bonus_from_the_last_row():
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    q = np.array([[0.5, 0.5, 0.0], [0.4, 0.3, 0.3]])
    # pos 0: p/q = 1 -> kept; pos 1: p[1,1]/q[1,1] = 1 -> kept; bonus from p[2] = token 2
    assert rejection_accept([1, 1], q, p, ScriptedRng(0.99, 0.99, 0.3)) == [1, 1, 2]


def test_rejection_samples_the_residual_and_stops():
    p = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    q = np.array([[0.6, 0.2, 0.2]])
    # accept token 0 with prob 0.2/0.6 = 1/3: u = 0.5 rejects; residual (0, 0.1, 0.3) / 0.4:
    # u = 0.2 -> 0.08 < 0.1 -> token 1, u = 0.3 -> 0.12 -> token 2
    assert rejection_accept([0], q, p, ScriptedRng(0.5, 0.2)) == [1]
    assert rejection_accept([0], q, p, ScriptedRng(0.5, 0.3)) == [2]
    assert rejection_accept([0], q, p, ScriptedRng(0.3, 0.0)) == [0, 0]  # 0.3 < 1/3: kept, bonus 0


def test_deterministic_proposal_is_kept_with_probability_p():
    p = np.array([[0.25, 0.75, 0.0], [0.0, 1.0, 0.0]])
    assert rejection_accept([1], None, p, ScriptedRng(0.7, 0.5)) == [1, 1]  # 0.7 < 0.75
    assert rejection_accept([1], None, p, ScriptedRng(0.8, 0.99)) == [0]  # residual: p without 1 = token 0
    assert rejection_accept([2], None, p, ScriptedRng(0.0, 0.5)) == [1]  # p[2] = 0: never kept


def test_zero_drafts_samples_one_token_from_p():
    assert rejection_accept([], None, np.array([[0.0, 0.0, 1.0]]), np.random.default_rng(0)) == [2]


def test_residual_edge_cases():
    p = np.array([0.2, 0.3, 0.5])
    assert np.allclose(residual(p, p.copy(), 1), p)  # all-zero residual falls back to p
    assert np.allclose(residual(p, None, 2), [0.2, 0.3, 0.0])
    assert np.allclose(residual(np.array([0.0, 1.0]), None, 1), [0.0, 1.0])  # p = one-hot(d): p itself
    assert accept_probability(p, np.array([0.0, 0.5, 0.5]), 0) == 1.0
    assert accept_probability(np.array([0.0, 1.0]), np.array([0.5, 0.5]), 0) == 0.0


def test_sample_never_draws_zero_weight():
    w = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    assert {sample(w, ScriptedRng(u)) for u in (0.0, 0.25, 0.5, 0.999999)} == {1, 3}


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="p must be"):
        rejection_accept([1], None, np.ones((1, 3)) / 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="q must be"):
        rejection_accept([1], np.ones((2, 3)) / 3, np.ones((2, 3)) / 3, np.random.default_rng(0))


# -- exact distribution, by enumerating the draft's sampling --

def one_step_exact(p_row: np.ndarray, q_row: np.ndarray | None, d: int) -> np.ndarray:
    """Distribution of the token emitted at a position whose draft is d (kept, or residual sample)."""
    a = accept_probability(p_row, q_row, d)
    res = residual(p_row, q_row, d)
    return a * np.eye(len(p_row))[d] + (1 - a) * res / res.sum()


@pytest.mark.parametrize("seed", range(5))
def test_first_token_is_exactly_p(seed):
    P, Q = markov(5, seed)
    for p_row, q_row in zip(P, Q):
        mixed = sum(q_row[d] * one_step_exact(p_row, q_row, d) for d in range(5))
        assert np.allclose(mixed, p_row, atol=1e-12)
        for d in range(5):  # deterministic proposal: exact for every proposed token
            assert np.allclose(one_step_exact(p_row, None, d), p_row, atol=1e-12)


def step_outcomes(P, Q, c: int, k: int, deterministic: bool) -> dict:
    """Exact distribution of one speculation step's emitted tokens from context token c."""
    out = {}
    v = len(P)
    for drafts in product(range(v), repeat=k):
        ctx = (c,) + drafts
        w = 1.0 if deterministic else np.prod([Q[ctx[i], drafts[i]] for i in range(k)])
        if deterministic and drafts != deterministic_drafts(c, k, v):
            continue
        prefix, alive = (), w
        for i, d in enumerate(drafts):
            q_row = None if deterministic else Q[ctx[i]]
            a = accept_probability(P[ctx[i]], q_row, d)
            res = residual(P[ctx[i]], q_row, d)
            for x in range(v):
                out[prefix + (x,)] = out.get(prefix + (x,), 0.0) + alive * (1 - a) * res[x] / res.sum()
            prefix, alive = prefix + (d,), alive * a
        for x in range(v):
            out[prefix + (x,)] = out.get(prefix + (x,), 0.0) + alive * P[ctx[k], x]
    return out


def deterministic_drafts(c: int, k: int, v: int) -> tuple:
    """A stand-in n-gram proposer: a fixed function of the context."""
    return tuple((c + 1 + i) % v for i in range(k))


def speculative_exact(P, Q, c: int, t: int, k: int, deterministic: bool) -> dict:
    """Distribution of the first t tokens emitted by repeated speculation steps from token c."""
    @lru_cache(maxsize=None)
    def first(c: int, t: int) -> tuple:
        dist = {}
        for emitted, w in step_outcomes(P, Q, c, k, deterministic).items():
            tails = {(): 1.0} if len(emitted) >= t else dict(first(emitted[-1], t - len(emitted)))
            for tail, wt in tails.items():
                key = (emitted + tail)[:t]
                dist[key] = dist.get(key, 0.0) + w * wt
        return tuple(dist.items())
    return dict(first(c, t))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("deterministic", [False, True])
def test_emitted_sequence_is_exactly_autoregressive_p(k, deterministic):
    P, Q = markov(4, seed=k)
    for c in range(4):
        spec = speculative_exact(P, Q, c, 3, k, deterministic)
        assert tv(spec, exact_target(P, c, 3)) < 1e-12


# -- Monte Carlo on rejection_accept itself --

def speculate(P, Q, c: int, t: int, k: int, deterministic: bool, rng) -> tuple:
    """First t tokens emitted by repeated rejection_accept steps, drafts sampled from Q (or fixed)."""
    out = []
    while len(out) < t:
        if deterministic:
            drafts, q = list(deterministic_drafts(c, k, len(P))), None
        else:
            drafts, rows = [], []
            for _ in range(k):
                rows.append(Q[drafts[-1] if drafts else c])
                drafts.append(sample(rows[-1], rng))
            q = np.stack(rows)
        p = P[[c] + drafts]  # [k+1, V]: the target's rows along the drafted path
        out += rejection_accept(drafts, q, p, rng)
        c = out[-1]
    return tuple(out[:t])


def monte_carlo(P, Q, c, t, k, deterministic, n, seed) -> dict:
    rng = np.random.default_rng(seed)
    counts = {}
    for _ in range(n):
        key = speculate(P, Q, c, t, k, deterministic, rng)
        counts[key] = counts.get(key, 0) + 1
    return {key: m / n for key, m in counts.items()}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("deterministic", [False, True])
def test_first_token_monte_carlo(k, deterministic):
    P, Q = markov(5, seed=10 + k)
    got = monte_carlo(P, Q, 0, 1, k, deterministic, n=40000, seed=k)
    assert tv(got, exact_target(P, 0, 1)) <= 0.01


@pytest.mark.parametrize("deterministic", [False, True])
def test_first_two_tokens_monte_carlo(deterministic):
    P, Q = markov(3, seed=7)
    got = monte_carlo(P, Q, 2, 2, 2, deterministic, n=40000, seed=3)
    assert tv(got, exact_target(P, 2, 2)) <= 0.01
