"""Structured output on the engine thread: one grammar matcher per constrained request.

Before sampling, the constrained rows' allowed-token bitmasks are filled in one batched call
(llguidance's executor, off the GIL) and applied to those rows' logits in one MLX op; after
sampling, each matcher consumes its row's token. Unconstrained rows in the same batch are
untouched, so constrained and free requests share every forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from kernels.token_mask import apply_token_bitmask
from schemas.grammar import CompiledGrammar, GrammarBackend, Matcher


@dataclass
class Advance:
    """What the matchers say after a step's tokens."""

    stop_after: set[str] = field(default_factory=set)
    """Requests whose document is complete: finish as "stop" once the token is appended."""
    errors: dict[str, str] = field(default_factory=dict)
    """Requests whose token the grammar rejected (a bug if it ever happens: masks forbid it)."""


class StructuredOutput:
    def __init__(self, backend: GrammarBackend | None) -> None:
        self.backend = backend
        self._matchers: dict[str, Matcher] = {}

    def add(self, request_id: str, grammar: CompiledGrammar) -> None:
        if self.backend is None:
            raise ValueError("structured output is not available for this model's tokenizer")
        self._matchers[request_id] = self.backend.new_matcher(grammar)

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def apply_masks(self, logits: mx.array, request_ids: Sequence[str]) -> mx.array:
        """logits [S, V] of the sampling rows (row i = request_ids[i]); constrained rows masked."""
        rows = [i for i, rid in enumerate(request_ids) if rid in self._matchers]
        if not rows:
            return logits
        masks = np.empty((len(rows), self.backend.mask_words), dtype=np.int32)  # [K, W]
        self.backend.fill_masks([self._matchers[request_ids[i]] for i in rows], masks)
        if len(rows) == len(request_ids):
            return apply_token_bitmask(logits, mx.array(masks))
        idx = mx.array(rows, dtype=mx.int32)
        logits[idx] = apply_token_bitmask(logits[idx], mx.array(masks))
        return logits

    def advance(self, sampled: Mapping[str, int], finishing: Mapping[str, bool]) -> Advance:
        """Feed each constrained request its token; finishing[rid] marks a stop/EOS token (not consumed)."""
        result = Advance()
        for rid, token in sampled.items():
            matcher = self._matchers.get(rid)
            if matcher is None or finishing.get(rid, False):
                continue
            if not matcher.consume(token):
                result.errors[rid] = f"grammar rejected token {token}: {matcher.error() or 'unknown reason'}"
            elif matcher.is_stopped():
                result.stop_after.add(rid)
        return result
