"""Per-request sampling parameters (pure Python, validated at construction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlx_loom.schemas.grammar import CompiledGrammar


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request; field names follow the OpenAI/vLLM API."""

    max_tokens: int = 16
    """Most new tokens to generate (finish_reason "length" when reached)."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 (or -1) disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    seed: int | None = None
    """Same seed -> same tokens, alone or inside any batch."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end the request (not emitted)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS tokens."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI)."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of generated tokens (OpenAI)."""
    repetition_penalty: float = 1.0
    """Divides positive / multiplies negative logits of prompt+generated tokens (HF/vLLM)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling."""
    logprobs: bool = False
    """Return the log-probability of each sampled token."""
    top_logprobs: int = 0
    """Also return this many most likely alternatives per position (0..20)."""
    grammar: CompiledGrammar | None = field(default=None, compare=False)
    """Constrain the output to this compiled grammar (structured output); None = free text."""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    """Reserved for later features; never read by the sampler."""

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _check(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(self.top_k >= -1, "top_k", "must be >= 0 (0 or -1 disables)")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        # symmetric in log space: a factor beyond 10 either way bans or forces tokens (1e-300 is 0 in float32)
        _check(0.1 <= self.repetition_penalty <= 10.0, "repetition_penalty", "must be in [0.1, 10]")
        _check(0 <= self.top_logprobs <= 20, "top_logprobs", "must be in [0, 20]")
        for tok, bias in self.logit_bias:
            _check(-100.0 <= bias <= 100.0, "logit_bias", f"bias for token {tok} must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}")
