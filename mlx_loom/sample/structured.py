"""Structured output on the engine thread: one grammar matcher per constrained request.

Before sampling, the constrained rows' allowed-token bitmasks are filled in one batched call
(llguidance's executor, off the GIL) and applied to those rows' logits in one MLX op; after
sampling, each matcher consumes its row's token. Unconstrained rows in the same batch are
untouched, so constrained and free requests share every forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from mlx_loom.kernels.token_mask import apply_token_bitmask
from mlx_loom.schemas.grammar import (
    CompiledGrammar,
    GrammarBackend,
    Matcher,
    short_error,
)


@dataclass
class Advance:
    """What the matchers say after a step's tokens."""

    stop_after: set[str] = field(default_factory=set)
    """Requests whose document is complete: finish as "stop" once the token is appended."""
    errors: dict[str, str] = field(default_factory=dict)
    """Requests whose grammar failed: a token it rejected (masks should forbid that) or an engine
    limit hit while filling its mask. A short message (the engine's text cut to ~200 characters);
    the failing token and those after it are cut, so the request ends with the error alone."""
    cut: dict[str, int] = field(default_factory=dict)
    """Requests whose tokens end early (document complete, or grammar error): how many to keep."""

    def kept(self, sampled: Mapping[str, Sequence[int]]) -> dict[str, Sequence[int]]:
        return {rid: toks[: self.cut[rid]] if rid in self.cut else toks for rid, toks in sampled.items()}


def grammar_failure(error: str | None, token: int | None = None) -> str:
    """The client's message for a grammar that failed mid-generation (short: no parser-state dump)."""
    where = f" on token id {token}" if token is not None else ""
    return (f"structured output stopped: the grammar engine failed{where} ({short_error(error)}); "
            "simplify the JSON schema")


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

    def advance(self, sampled: Mapping[str, Sequence[int]], is_stop: Callable[[str, int], bool]) -> Advance:
        """Feed each constrained request its tokens in order (several after a speculative step);
        a stop/EOS token (is_stop) is not consumed and ends the walk."""
        result = Advance()
        for rid, tokens in sampled.items():
            matcher = self._matchers.get(rid)
            if matcher is None:
                continue
            failed = matcher.error()  # set while filling the mask (a limit): the mask was not the grammar's
            if failed is not None:
                result.errors[rid] = grammar_failure(failed)
                result.cut[rid] = 0
                continue
            for n, token in enumerate(tokens, start=1):
                if is_stop(rid, token):
                    break
                if not matcher.consume(token):
                    result.errors[rid] = grammar_failure(matcher.error(), token)
                    result.cut[rid] = n - 1
                    break
                if matcher.is_stopped():
                    result.stop_after.add(rid)
                    result.cut[rid] = n
                    break
        return result

    def mask_drafts(self, request_id: str, drafts: Sequence[int], logits: np.ndarray) -> tuple[int, np.ndarray]:
        """A speculative row's logits [k+1, V]: masked at each position with the grammar state after
        the drafts before it. The matcher walks the drafts and rolls back; drafts past the first one
        the grammar refuses are not verifiable. Returns (number of verifiable drafts, logits)."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return len(drafts), logits
        masks = np.empty((len(drafts) + 1, self.backend.mask_words), dtype=np.int32)  # [k+1, W]
        self.backend.fill_masks([matcher], masks[:1])
        valid = 0
        for token in drafts:
            # Check the mask first: consuming a refused token puts the matcher in an error state.
            allowed_here = (int(masks[valid, token >> 5]) >> (token & 31)) & 1 if token >> 5 < masks.shape[1] else 0
            if matcher.is_stopped() or not allowed_here or not matcher.consume(token):
                break
            valid += 1
            self.backend.fill_masks([matcher], masks[valid : valid + 1])
        if valid:
            matcher.rollback(valid)
        allowed = np.unpackbits(masks[: valid + 1].view(np.uint8), axis=-1, bitorder="little")  # [n, W*32]
        out = np.array(logits[: valid + 1], dtype=np.float32)
        vocab = out.shape[-1]
        if allowed.shape[-1] < vocab:  # ids past the tokenizer's vocabulary are never allowed
            allowed = np.pad(allowed, ((0, 0), (0, vocab - allowed.shape[-1])))
        out[allowed[:, :vocab] == 0] = -np.inf
        return valid, out
