"""Request fields -> one SamplingParams per choice, with every limit checked before submission.

All checks that can be made here are made here (400 with the field named), so the engine only
sees requests it can run: prompt within the context, prompt + max_tokens within the context
and the KV pool, token ids inside the vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from mlx_loom.sched.params import SamplingParams
from mlx_loom.server.errors import bad_request
from mlx_loom.server.protocol import ChatCompletionRequest, CompletionRequest

MAX_STOP_STRINGS = 16
SEED_SPACE = 2**63


@dataclass(frozen=True)
class Limits:
    """What the loaded engine can take (from EngineInfo)."""

    max_model_len: int
    pool_tokens: int | None  # KV pool size in tokens; None if the engine does not say
    vocab_size: int | None

    @property
    def capacity(self) -> int:
        """Most prompt + completion tokens one request can ever hold."""
        return min(self.max_model_len, self.pool_tokens or self.max_model_len)


def limits_of(info) -> Limits:
    blocks, block_size = getattr(info, "num_blocks", None), getattr(info, "block_size", None)
    vocab = getattr(info.tokenizer, "vocab_size", None)
    return Limits(info.max_model_len, blocks * block_size if blocks and block_size else None,
                  vocab if isinstance(vocab, int) else None)


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise bad_request("stop strings must be non-empty", "stop")
    return tuple(dict.fromkeys(stops))


def check_prompt(prompt_ids: Sequence[int], limits: Limits, param: str) -> None:
    if not prompt_ids:
        raise bad_request("the prompt is empty (it encodes to zero tokens)", param)
    if len(prompt_ids) >= limits.capacity:
        raise bad_request(
            f"the prompt has {len(prompt_ids)} tokens but this server's context holds {limits.capacity} "
            "(prompt + completion); shorten the prompt", param, "context_length_exceeded")
    if limits.vocab_size is not None:
        bad = [t for t in prompt_ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})", param)


def resolve_max_tokens(requested: int | None, default: int | None, prompt_len: int, limits: Limits,
                       param: str) -> int:
    """Requested max_tokens must fit; the default is clamped to what is left of the context."""
    room = limits.capacity - prompt_len
    if requested is None:
        return min(default, room) if default is not None else room
    if requested > room:
        raise bad_request(
            f"{param}={requested} plus the prompt's {prompt_len} tokens exceeds this server's context of "
            f"{limits.capacity} tokens; use {param} <= {room}", param, "context_length_exceeded")
    return requested


# A token id as OpenAI writes it: ASCII digits, no sign, spaces, exponent or leading zeros
# (int() alone would take " 12", "+5", "1_0" and non-ASCII digits such as "١٢").
_TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,18}")


def logit_bias(raw: dict[str, float] | None, limits: Limits) -> tuple[tuple[int, float], ...]:
    out = []
    for key, bias in (raw or {}).items():
        if not _TOKEN_ID.fullmatch(key):
            raise bad_request(f"logit_bias keys must be token ids written as plain decimal integers "
                              f"(like \"123\"), got {key!r}", "logit_bias")
        tok = int(key)
        if limits.vocab_size is not None and tok >= limits.vocab_size:
            raise bad_request(f"logit_bias token id {tok} is outside the vocabulary [0, {limits.vocab_size})",
                              "logit_bias")
        out.append((tok, float(bias)))
    return tuple(out)


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of n uses seed + i (kept non-negative for the engine's generators)."""
    return None if seed is None else (seed + index) % SEED_SPACE


def base_params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int, limits: Limits) -> dict:
    """SamplingParams keyword arguments shared by the choices of one request."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs: true", "top_logprobs")
        logprobs, top = bool(req.logprobs), req.top_logprobs or 0
    else:
        logprobs, top = req.logprobs is not None, req.logprobs or 0
    stop_ids = tuple(req.stop_token_ids or ())
    if any(t < 0 or (limits.vocab_size is not None and t >= limits.vocab_size) for t in stop_ids):
        raise bad_request("stop_token_ids contains an id outside the vocabulary", "stop_token_ids")
    kwargs = dict(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        min_p=req.min_p, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, ignore_eos=req.ignore_eos,
        logit_bias=logit_bias(req.logit_bias, limits), stop_token_ids=stop_ids,
        logprobs=logprobs, top_logprobs=top,
    )
    return {k: v for k, v in kwargs.items() if v is not None}


def make_params(kwargs: dict, seed: int | None, index: int) -> SamplingParams:
    try:
        return SamplingParams(**kwargs, seed=choice_seed(seed, index))
    except ValueError as exc:  # SamplingParams names the field first: "top_p must be in (0, 1]"
        raise bad_request(str(exc), str(exc).split(" ", 1)[0]) from None
