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
    acceptance: dict[str, float] = field(default_factory=dict)
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
        return best if self.last_speedup >= self.min_speedup else 0

    def observe(self, request_id: str, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        rate = accepted / proposed
        old = self.acceptance.get(request_id, self.prior_acceptance)
        self.acceptance[request_id] = (1 - self.ema) * old + self.ema * rate

    def forget(self, request_id: str) -> None:
        self.acceptance.pop(request_id, None)
