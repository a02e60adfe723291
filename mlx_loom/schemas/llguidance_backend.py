"""GrammarBackend on llguidance (the engine behind outlines' and guidance's llguidance backends).

The token view (LLTokenizer) is built once per model from the tokenizer's own JSON. JSON is
compiled with fixed separators ", " and ": " and no other whitespace outside strings, so a weak
model cannot loop on spaces or newlines; llguidance never lets special tokens (e.g.
<|im_start|>) into a lexeme, and allows EOS only where the document is complete. Unknown
schema keywords are errors (lenient: false): a constraint is never silently dropped.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Sequence

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par

from mlx_loom.schemas.grammar import CompiledGrammar, GrammarError, GrammarSpec

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
CACHE_SIZE = 256


class LLGuidanceMatcher:
    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.inner = matcher

    def consume(self, token: int) -> bool:
        return self.inner.consume_token(token)

    def is_stopped(self) -> bool:
        return self.inner.is_stopped()

    def is_accepting(self) -> bool:
        return self.inner.is_accepting()

    def rollback(self, num_tokens: int) -> None:
        self.inner.rollback(num_tokens)

    def error(self) -> str | None:
        return self.inner.get_error() if self.inner.is_error() else None


class LLGuidanceBackend:
    def __init__(self, tokenizer, vocab_size: int | None = None) -> None:
        """tokenizer: mlx_loom.scheduler.tokenizer.TextTokenizer (its .backend is a `tokenizers.Tokenizer`)."""
        backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "inner", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise ValueError("structured output needs a fast (tokenizers) tokenizer")
        self.vocab_size = int(vocab_size or tokenizer.vocab_size)
        self.mask_words = (self.vocab_size + 31) // 32
        eos = sorted(tokenizer.eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=eos)
        self.executor = llguidance.LLExecutor(num_threads=2)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                return hit
        t0 = time.perf_counter()
        compiled = CompiledGrammar(spec, self._grammar(spec), (time.perf_counter() - t0) * 1e3)
        with self._lock:
            self._cache[spec.key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _grammar(self, spec: GrammarSpec) -> str:
        schema = spec.schema_obj()
        param = "response_format" if spec.kind == "json_object" else "response_format.json_schema.schema"
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(f"invalid JSON schema: {exc}", param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error or messages:
            # Warnings name constraints llguidance would not enforce: refuse rather than fail open.
            detail = "; ".join(m.strip() for m in messages) or "unknown error"
            raise GrammarError(f"the JSON schema cannot be enforced: {detail}", param)
        return grammar

    def new_matcher(self, grammar: CompiledGrammar) -> LLGuidanceMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar.grammar, log_level=1)
        if matcher.is_error():
            raise GrammarError(f"grammar failed to start: {matcher.get_error()}")
        return LLGuidanceMatcher(matcher)

    def fill_masks(self, matchers: Sequence[LLGuidanceMatcher], out: np.ndarray) -> None:
        assert out.dtype == np.int32 and out.flags["C_CONTIGUOUS"] and out.shape == (len(matchers), self.mask_words)
        fill_next_token_bitmask_par(self.executor, [(m.inner, i) for i, m in enumerate(matchers)], out)
