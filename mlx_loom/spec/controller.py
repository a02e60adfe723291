"""When to speculate, and how far: a cost model measured at start-up plus tracked acceptance.

A speculative step with k drafts per row costs k draft forwards and one target forward over
k+1 tokens per row, and yields E(a, k) = (1 - a^(k+1)) / (1 - a) tokens per row on average
(a = per-token acceptance). A plain step costs one target decode forward and yields 1. The
modelled speedup is E * t_decode(B) / (k * t_draft(B) + t_verify(B * (k+1))); the controller
picks the k in 1..k_max with the best one and speculates only when it exceeds min_speedup.
So on a backend where a draft forward costs nearly a target forward (MLX's CPU backend) it
turns itself off, and at large batch, where verification tokens stop being free, it backs off.
Costs are pure Python data (pure module: unit-tested without a model).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LinearCost:
    """Seconds for a forward over n tokens: fixed + per_token * n (fitted from two measurements)."""

    fixed: float
    per_token: float

    @classmethod
    def fit(cls, n1: int, t1: float, n2: int, t2: float) -> LinearCost:
        slope = max(0.0, (t2 - t1) / (n2 - n1)) if n2 != n1 else 0.0
        return cls(max(0.0, t1 - slope * n1), slope)

    def __call__(self, n: int) -> float:
        return self.fixed + self.per_token * n


@dataclass(frozen=True)
class SpecCosts:
    decode: LinearCost  # target, one token per row (the plain step), by number of rows
    verify: LinearCost  # target, k+1 tokens per row, by total tokens
    draft: LinearCost  # one draft forward, one token per row, by number of rows


def expected_tokens(acceptance: float, k: int) -> float:
    """Mean tokens emitted per row by a step with k drafts (accepted drafts + the target's token)."""
    a = min(max(acceptance, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


def modelled_speedup(costs: SpecCosts, rows: int, acceptance: float, k: int) -> float:
    plain = costs.decode(rows)
    spec = k * costs.draft(rows) + costs.verify(rows * (k + 1))
    return expected_tokens(acceptance, k) * plain / spec if spec > 0 else 0.0


@dataclass
class SpecController:
    k_max: int
    always: bool = False
    """Speculate with k_max on every eligible row (tests, and measuring acceptance on a slow backend)."""
    min_speedup: float = 1.05
    costs: SpecCosts | None = None
    prior_acceptance: float = 0.7
    """Assumed per-token acceptance before a request has history (the default model's MXFP4 draft: ~0.73)."""
    ema: float = 0.3
    recovery: float = 0.05
    """While a request is not speculated its estimate drifts back toward the prior by this share per
    step, so a request that looked bad is probed again later instead of never (no drafts, no news)."""
    acceptance: dict[str, float] = field(default_factory=dict)
    """Per-request estimate of the per-token acceptance a: decayed accepted / tried token counts."""
    _counts: dict[str, tuple[float, float]] = field(default_factory=dict)
    last_speedup: float = 0.0

    def choose_k(self, rows: int, request_ids: list[str]) -> int:
        """Drafts per row for this step (0 = do not speculate)."""
        if self.always:
            return self.k_max
        if self.costs is None or not request_ids:
            return 0
        a = sum(self.acceptance.get(r, self.prior_acceptance) for r in request_ids) / len(request_ids)
        best = max(range(1, self.k_max + 1), key=lambda k: modelled_speedup(self.costs, rows, a, k))
        self.last_speedup = modelled_speedup(self.costs, rows, a, best)
        if self.last_speedup >= self.min_speedup:
            return best
        for r in request_ids:
            self._recover(r)
        return 0

    def _recover(self, request_id: str) -> None:
        """One step without drafts: the estimate moves `recovery` of the way back to the prior."""
        if request_id not in self.acceptance:
            return
        a = self.acceptance[request_id]
        a = self.acceptance[request_id] = a + self.recovery * (self.prior_acceptance - a)
        if request_id in self._counts:
            tried = self._counts[request_id][1]
            self._counts[request_id] = (a * tried, tried)

    def observe(self, request_id: str, proposed: int, accepted: int) -> None:
        """Verification kept `accepted` of `proposed` drafts. A run stops at its first rejection, so
        the tokens tried are the accepted ones plus that rejection (if any); a = accepted / tried over
        decayed counts (the prior weighs as 1 / ema tokens). The fraction of drafts kept would
        understate a (0.44 for a = 0.7, k = 4) and switch good drafts off."""
        if proposed <= 0:
            return
        keep = 1 - self.ema
        acc, tried = self._counts.get(request_id, (self.prior_acceptance / self.ema, 1 / self.ema))
        acc, tried = keep * acc + accepted, keep * tried + accepted + (accepted < proposed)
        self._counts[request_id] = (acc, tried)
        self.acceptance[request_id] = acc / tried

    def forget(self, request_id: str) -> None:
        self.acceptance.pop(request_id, None)
        self._counts.pop(request_id, None)
