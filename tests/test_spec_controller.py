"""The speculation cost model and controller (mlx_loom/spec/controller.py), without a model.

Expected values are worked out by hand in the comments, or independently of the code's closed form
(enumerating accept/reject patterns, or simulating greedy verification), never by calling the
formula under test to produce its own expectation.
"""

from itertools import product

import numpy as np
import pytest

from mlx_loom.spec.acceptance import greedy_accept
from mlx_loom.spec.controller import (LinearCost, SpecController, SpecCosts, expected_tokens,
                                                modelled_speedup)

# A GPU-like table in arbitrary time units: a verification forward over k+1 tokens per row costs
# what a decode step costs (memory-bound, extra tokens are free), a draft forward a tenth of it.
# Then speedup(k) = E(a, k) / (1 + 0.1 k); at a = 0.7:
#   k=1: 1.7/1.1 = 1.545   k=2: 2.19/1.2 = 1.825   k=3: 2.533/1.3 = 1.948
#   k=4: 2.7731/1.4 = 1.981   k=5: 2.94117/1.5 = 1.961   k=6: 3.058819/1.6 = 1.912
CHEAP = SpecCosts(decode=LinearCost(1.0, 0.0), verify=LinearCost(1.0, 0.0), draft=LinearCost(0.1, 0.0))

# Costs that grow with the batch: per row / per token, a verified token costs what a decoded row
# costs (compute-bound at large batch), the draft is cheap. Worth it at batch 1, not at batch 256.
BATCHED = SpecCosts(decode=LinearCost(0.010, 0.0002), verify=LinearCost(0.010, 0.0002),
                    draft=LinearCost(0.001, 0.00005))

# MLX's CPU backend: a draft forward costs 80% of a target forward.
CPU_LIKE = SpecCosts(decode=LinearCost(0.010, 0.001), verify=LinearCost(0.010, 0.001),
                     draft=LinearCost(0.008, 0.0008))


# -- LinearCost --

def test_linear_cost_fit_through_two_points():
    c = LinearCost.fit(1, 0.010, 8, 0.024)  # slope 0.014 / 7 = 0.002, intercept 0.010 - 0.002 = 0.008
    assert c.per_token == pytest.approx(0.002) and c.fixed == pytest.approx(0.008)
    assert c(1) == pytest.approx(0.010) and c(8) == pytest.approx(0.024)
    assert c(64) == pytest.approx(0.008 + 0.002 * 64)  # extrapolates linearly: 0.136
    assert LinearCost.fit(8, 0.024, 1, 0.010) == c  # the order of the two points does not matter


def test_linear_cost_fit_never_goes_negative():
    # Noise made the larger measurement faster: flat at the first time, not a negative slope.
    flat = LinearCost.fit(1, 0.010, 8, 0.009)
    assert flat == LinearCost(0.010, 0.0)
    assert flat(1000) == pytest.approx(0.010)
    # Superlinear points (negative intercept): the intercept is clamped to 0, the slope kept.
    steep = LinearCost.fit(1, 0.001, 8, 0.050)  # slope 0.049 / 7 = 0.007, intercept -0.006 -> 0
    assert steep.fixed == 0.0 and steep.per_token == pytest.approx(0.007)
    assert steep(0) == 0.0 and steep(8) == pytest.approx(0.056)
    # One point twice: a constant.
    assert LinearCost.fit(4, 0.02, 4, 0.03) == LinearCost(0.02, 0.0)


# -- expected_tokens --

def _enumerated_tokens(a: float, k: int) -> float:
    """Mean emitted tokens over every accept/reject pattern of k drafts (each kept with prob a):
    the target keeps the leading run of accepted drafts and always adds one token of its own."""
    mean = 0.0
    for pattern in product((True, False), repeat=k):
        prob = np.prod([a if kept else 1 - a for kept in pattern]) if k else 1.0
        run = next((i for i, kept in enumerate(pattern) if not kept), k)
        mean += prob * (run + 1)
    return mean


@pytest.mark.parametrize("a", [0.0, 0.3, 0.7, 0.95])
@pytest.mark.parametrize("k", [0, 1, 2, 4, 6])
def test_expected_tokens_matches_enumeration(a, k):
    assert expected_tokens(a, k) == pytest.approx(_enumerated_tokens(a, k), rel=1e-12, abs=1e-12)


def test_expected_tokens_matches_simulated_greedy_verification():
    """Drafts that equal the target's argmax with probability 0.7 each, verified by greedy_accept."""
    rng = np.random.default_rng(0)
    a, k, n = 0.7, 4, 20000
    target = rng.integers(0, 100, size=(n, k + 1))
    agree = rng.random((n, k)) < a
    draft = np.where(agree, target[:, :k], target[:, :k] + 100)  # a disagreeing draft never matches
    emitted = [len(greedy_accept(list(d), list(t))) for d, t in zip(draft, target)]
    # by hand: 1 + .7 + .49 + .343 + .2401 = 2.7731; the sample's std is ~1.4, so 0.04 is ~5 sigma
    assert np.mean(emitted) == pytest.approx(2.7731, abs=0.04)
    assert expected_tokens(a, k) == pytest.approx(2.7731)


def test_expected_tokens_bounds():
    assert expected_tokens(0.0, 5) == 1.0  # every draft rejected: the target's token only
    assert expected_tokens(-0.5, 3) == 1.0  # clamped to 0
    full = expected_tokens(1.0, 4)  # clamped to 0.999 (no division by zero): just under k + 1
    assert 4.98 < full < 5.0
    assert expected_tokens(0.7, 0) == 1.0
    values = [expected_tokens(0.7, k) for k in range(8)]
    assert all(b > a for a, b in zip(values, values[1:]))  # more drafts never emit fewer tokens
    assert values[-1] < 1 / (1 - 0.7)  # ... but saturate below 1 / (1 - a)


# -- modelled_speedup --

def test_modelled_speedup_by_hand():
    costs = SpecCosts(decode=LinearCost(0.010, 0.001), verify=LinearCost(0.010, 0.0005),
                      draft=LinearCost(0.002, 0.0001))
    # rows 4, a 0.8, k 3: plain = 0.010 + 4 * 0.001 = 0.014
    # spec = 3 drafts * (0.002 + 4 * 0.0001) + verify over 4 * 4 tokens (0.010 + 16 * 0.0005) = 0.0072 + 0.018
    # E = 1 + 0.8 + 0.64 + 0.512 = 2.952 -> 2.952 * 0.014 / 0.0252 = 1.64
    assert modelled_speedup(costs, 4, 0.8, 3) == pytest.approx(1.64)
    # CHEAP at a = 0.7, k = 4: 2.7731 / 1.4
    assert modelled_speedup(CHEAP, 1, 0.7, 4) == pytest.approx(2.7731 / 1.4)
    # BATCHED at 256 rows, k = 1: plain 0.010 + 0.0512 = 0.0612; spec = (0.001 + 0.0128) + (0.010 + 512 * 0.0002)
    assert modelled_speedup(BATCHED, 256, 0.7, 1) == pytest.approx(1.7 * 0.0612 / (0.0138 + 0.1124))


def test_modelled_speedup_properties():
    scaled = SpecCosts(*(LinearCost(c.fixed * 1000, c.per_token * 1000) for c in
                         (BATCHED.decode, BATCHED.verify, BATCHED.draft)))
    for rows in (1, 7, 64):  # a ratio: the time unit does not matter
        assert modelled_speedup(scaled, rows, 0.6, 3) == pytest.approx(modelled_speedup(BATCHED, rows, 0.6, 3))
    by_acceptance = [modelled_speedup(BATCHED, 4, a, 3) for a in (0.0, 0.3, 0.6, 0.9)]
    assert all(y > x for x, y in zip(by_acceptance, by_acceptance[1:]))
    by_rows = [modelled_speedup(BATCHED, r, 0.7, 2) for r in (1, 4, 16, 64, 256)]
    assert all(y < x for x, y in zip(by_rows, by_rows[1:]))
    zero = SpecCosts(LinearCost(0, 0), LinearCost(0, 0), LinearCost(0, 0))
    assert modelled_speedup(zero, 4, 0.7, 2) == 0.0  # no division by zero


# -- choose_k --

def test_choose_k_speculates_when_drafts_are_cheap():
    ctl = SpecController(k_max=8, costs=CHEAP)
    assert ctl.choose_k(1, ["r"]) == 4  # the best k is inside 1..k_max (table above), not k_max itself
    assert ctl.last_speedup == pytest.approx(2.7731 / 1.4)
    assert SpecController(k_max=3, costs=CHEAP).choose_k(1, ["r"]) == 3  # capped by k_max
    assert SpecController(k_max=1, costs=CHEAP).choose_k(1, ["r"]) == 1


def test_choose_k_backs_off_at_large_batch():
    ctl = SpecController(k_max=4, costs=BATCHED)
    # batch 1: plain 0.0102; k=4: spec 4 * 0.00105 + 0.010 + 5 * 0.0002 = 0.0152 -> 2.7731 * 0.0102 / 0.0152 = 1.861
    assert ctl.choose_k(1, ["r"]) == 4
    assert ctl.last_speedup == pytest.approx(2.7731 * 0.0102 / 0.0152)
    ids = [f"r{i}" for i in range(256)]
    # batch 256: the best is k=1 at 1.7 * 0.0612 / 0.1262 = 0.824 < 1.05
    assert ctl.choose_k(256, ids) == 0
    assert ctl.last_speedup == pytest.approx(1.7 * 0.0612 / 0.1262)
    ks = [ctl.choose_k(rows, ids[:rows]) for rows in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert all(b <= a for a, b in zip(ks, ks[1:]))  # drafts per row only shrink as the batch grows
    assert ks[0] > 0 and ks[-1] == 0


def test_choose_k_off_when_a_draft_costs_nearly_a_target_forward():
    ctl = SpecController(k_max=4, costs=CPU_LIKE)
    # batch 1, k=1: 1.7 * 0.011 / (0.0088 + 0.012) = 0.899; larger k is worse
    assert ctl.choose_k(1, ["r"]) == 0
    assert ctl.last_speedup < ctl.min_speedup


def test_min_speedup_threshold():
    # CHEAP at k=1 only (k_max 1): 1.7 / 1.1 = 1.545
    assert SpecController(k_max=1, costs=CHEAP, min_speedup=1.5).choose_k(1, ["r"]) == 1
    assert SpecController(k_max=1, costs=CHEAP, min_speedup=1.6).choose_k(1, ["r"]) == 0


def test_choose_k_without_costs_or_rows_and_in_always_mode():
    assert SpecController(k_max=4).choose_k(1, ["r"]) == 0  # auto without measured costs: off
    assert SpecController(k_max=4, costs=CHEAP).choose_k(3, []) == 0  # no eligible row
    always = SpecController(k_max=5, always=True, costs=CPU_LIKE)  # the cost model is not consulted
    assert always.choose_k(256, ["r"]) == 5 and always.choose_k(1, []) == 5


# -- acceptance tracking --

def test_observe_estimates_the_per_token_acceptance():
    ctl = SpecController(k_max=4, costs=CHEAP)  # prior 0.7, ema 0.3
    ctl.observe("r", 4, 0)  # rejected at once: 0 of 1 tokens tried
    assert ctl.acceptance["r"] == pytest.approx(0.7 * 0.7)  # 0.7 * 0.7 + 0.3 * 0
    # decayed counts (accepted, tried), the prior as (0.7, 1) / 0.3: (2.333, 3.333)
    # -> (0.7 * 2.333 + 0, 0.7 * 3.333 + 1) = (1.633, 3.333)
    ctl.observe("r", 4, 2)  # 2 accepted, then a rejection: 3 tokens tried
    assert ctl.acceptance["r"] == pytest.approx((0.7 * 1.63333 + 2) / (0.7 * 3.33333 + 3))  # 0.5894
    ctl.observe("r", 0, 0)  # nothing proposed: no information
    assert ctl.acceptance["r"] == pytest.approx(3.14333 / 5.33333)
    ctl.observe("r", 4, 4)  # all kept: no rejection seen
    assert ctl.acceptance["r"] == pytest.approx((0.7 * 3.14333 + 4) / (0.7 * 5.33333 + 4))  # 0.8018
    ctl.observe("s", 0, 0)
    assert "s" not in ctl.acceptance
    ctl.forget("r")
    assert "r" not in ctl.acceptance
    ctl.forget("never-seen")  # harmless


def test_low_acceptance_shrinks_k_to_zero():
    ctl = SpecController(k_max=8, costs=CHEAP)
    ks = [ctl.choose_k(1, ["bad"])]
    for _ in range(8):
        ctl.observe("bad", max(ks[-1], 1), 0)  # every draft rejected
        ks.append(ctl.choose_k(1, ["bad"]))
    assert ks[0] == 4 and ks[-1] == 0
    assert all(b <= a for a, b in zip(ks, ks[1:]))
    # k=1 needs (1 + a) / 1.1 >= 1.05, a >= 0.155; 0.7 * 0.7^5 = 0.118 < 0.155 <= 0.7 * 0.7^4 = 0.168
    assert ks.index(0) == 5
    assert ctl.choose_k(1, ["fresh"]) == 4  # per request: a new request starts from the prior


def test_a_request_switched_off_is_probed_again():
    """Off means no drafts and so no news: the estimate drifts back toward the prior (recovery 0.05 a
    step) until speculation is tried again, rather than staying off for the rest of the request."""
    ctl = SpecController(k_max=8, costs=CHEAP)
    ctl.acceptance["r"] = 0.0
    ks = [ctl.choose_k(1, ["r"]) for _ in range(40)]
    # a_n = 0.7 * (1 - 0.95^n) reaches 0.155 (k=1 pays) at n = ceil(log(1 - 0.155/0.7) / log(0.95)) = 5
    assert ks[:5] == [0] * 5 and ks[5] > 0
    assert ctl.acceptance["r"] == pytest.approx(0.7 * (1 - 0.95 ** 5))  # no drift while speculating


def test_per_token_estimate_matches_the_true_acceptance():
    """Simulated runs that stop at the first rejection (true a = 0.7, k = 4): the estimate averages
    near 0.7, where the fraction of drafts kept (~0.44) would have switched a good draft off."""
    rng = np.random.default_rng(0)
    ctl = SpecController(k_max=4, costs=CHEAP, ema=0.02)
    for _ in range(3000):
        run = next((i for i in range(4) if rng.random() >= 0.7), 4)
        ctl.observe("r", 4, run)
    assert ctl.acceptance["r"] == pytest.approx(0.7, abs=0.08)


def test_high_acceptance_grows_k_to_k_max():
    ctl = SpecController(k_max=8, costs=CHEAP)
    assert ctl.choose_k(1, ["good"]) == 4
    for _ in range(30):
        ctl.observe("good", 8, 8)
    assert ctl.acceptance["good"] > 0.999
    # a clamped to 0.999: k=8: (1 - 0.999^9) / 0.001 / 1.8 = 4.98 beats k=7: 7.97 / 1.7 = 4.69
    assert ctl.choose_k(1, ["good"]) == 8


def test_batch_uses_the_mean_acceptance_of_its_rows():
    ctl = SpecController(k_max=8, costs=CHEAP)
    ctl.acceptance.update(bad=0.1, good=0.9)
    k = ctl.choose_k(2, ["bad", "good", "new"])  # mean of 0.1, 0.9 and the prior 0.7 = 0.5667
    mean = (0.1 + 0.9 + 0.7) / 3
    assert ctl.last_speedup == pytest.approx(modelled_speedup(CHEAP, 2, mean, k))
    # by hand at a = 0.5667: k=2: (1 + .5667 + .3211) / 1.2 = 1.573, k=3: 2.0698 / 1.3 = 1.592,
    # k=4: 2.1739 / 1.4 = 1.553 -> 3
    assert k == 3
