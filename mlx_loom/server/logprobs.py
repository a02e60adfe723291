"""Engine TokenLogprobs -> OpenAI's two logprob shapes (chat and legacy completions)."""

from __future__ import annotations

import math
from typing import Sequence

from mlx_loom.engine.messages import TokenLogprob


class TokenText:
    """Text of single token ids, cached (the same ids recur in every top-k list)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def _finite(x: float) -> float:
    # JSON has no -inf; a token masked out (e.g. logit_bias -100 in float32) reports the floor.
    return x if math.isfinite(x) else -9999.0


def chat_logprobs(lps: Sequence[TokenLogprob], text_of: TokenText) -> dict:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}"""
    def entry(tid: int, lp: float) -> dict:
        tok = text_of(tid)
        return {"token": tok, "logprob": _finite(lp), "bytes": list(tok.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


def completion_logprobs(lps: Sequence[TokenLogprob], text_of: TokenText, want_top: bool, offset: int = 0) -> dict:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}; offsets start at `offset`."""
    tokens, offsets = [], []
    for lp in lps:
        tokens.append(text_of(lp.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    top = [{text_of(t): _finite(v) for t, v in lp.top} for lp in lps] if want_top else None
    return {"tokens": tokens, "token_logprobs": [_finite(lp.logprob) for lp in lps],
            "top_logprobs": top, "text_offset": offsets}
