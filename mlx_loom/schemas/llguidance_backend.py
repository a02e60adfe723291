"""GrammarBackend on llguidance (the engine behind outlines' and guidance's llguidance backends).

The token view (LLTokenizer) is built once per model from the tokenizer's own JSON. A schema is
first rewritten (rewrite.py under strict, best_effort.py otherwise); JSON is compiled with fixed
separators ", " and ": " and no other whitespace outside strings, so a weak model cannot loop
on spaces or newlines; llguidance never lets special tokens (e.g. <|im_start|>) into a lexeme, and allows EOS only where the document is complete. Under strict,
keywords llguidance does not implement are errors (lenient: false): a constraint is never silently
dropped; under best effort (best_effort.py) what is dropped is listed on the CompiledGrammar.

A schema the engine cannot generate from is refused at compile time rather than found mid-way:
`schema_checks` refuses $ref loops and required recursion (no finite instance); every matcher
runs under `parser_limits()` (regex fuel, terse errors); each new grammar gets a dry run (first
mask, a token, next mask, ...), so a limit the first tokens hit (a huge forced regex, an
unbounded forced prefix) or an empty first mask is a GrammarError; and each string constraint
(pattern, lengths) gets the same dry run alone, since a nested one is only lexed when reached.
Refusals are cached like grammars, so a hostile schema sent again costs nothing. A limit hit
later anyway ends only that request, with a short error (mlx_loom/sample/structured.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Sequence

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par

from mlx_loom.schemas.best_effort import best_effort
from mlx_loom.schemas.features import unsupported_message
from mlx_loom.schemas.grammar import CompiledGrammar, GrammarError, GrammarSpec, short_error
from mlx_loom.schemas.rewrite import prepare
from mlx_loom.schemas.schema_checks import recursion_problem, string_constraints

log = logging.getLogger("mlx_loom.schemas")

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
CACHE_SIZE = 256
INITIAL_LEXER_FUEL = 300_000
"""Regex-building fuel per grammar (llguidance's default is 1M, ~50k/ms). A 1000-value enum or 300
patterned properties need well under this; "^a{1000000}$" fails in ~0.1 s instead of ~0.4-1.2 s."""
DRY_RUN_TOKENS = 2
"""Tokens a compile-time dry run consumes (lowest allowed id each time) after the first mask."""
REGEX_ERROR = "regex parse error"
"""How llguidance's refusal of a pattern it cannot parse (look-around, backreferences) begins."""
STRING_CHECK_BUDGET_S = 1.0
"""Most seconds spent dry-running a schema's string constraints one by one."""


def parser_limits() -> llguidance.LLParserLimits:
    """The limits every validation, dry run and engine matcher runs under (terse errors: no parser dump)."""
    return llguidance.LLParserLimits(initial_lexer_fuel=INITIAL_LEXER_FUEL, verbose_errors=False)


def _limit_message(stop_reason: str, error: str) -> str:
    """A short client message for a grammar that failed in the dry run."""
    detail = short_error(error)
    # After a failed step llguidance reports "InternalError"; the error text names the part that gave up.
    if stop_reason == "LexerTooComplex" or detail.startswith("lexer error"):
        return (f"a string constraint in the JSON schema is too large to enforce ({detail}); "
                "use a shorter pattern, smaller repetition counts or lengths")
    if stop_reason == "ParserTooComplex" or "too many items" in detail.lower():
        return (f"the JSON schema is too complex to enforce ({detail}); check for required recursion "
                "(no finite instance) or too many alternatives")
    return f"the JSON schema cannot be enforced ({detail})"


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
        """tokenizer: mlx_loom.models.tokenizer.TextTokenizer (its .backend is a `tokenizers.Tokenizer`)."""
        backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "inner", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise ValueError("structured output needs a fast (tokenizers) tokenizer")
        self.vocab_size = int(vocab_size or tokenizer.vocab_size)
        self.mask_words = (self.vocab_size + 31) // 32
        eos = sorted(tokenizer.eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=eos)
        self.executor = llguidance.LLExecutor(num_threads=2)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._patterns: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Cached by spec key, refusals too (the same GrammarError is raised again)."""
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
        if isinstance(hit, GrammarError):
            raise GrammarError(str(hit), hit.param)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        try:
            result: CompiledGrammar | GrammarError = self._build(spec, t0)
        except GrammarError as exc:
            result = exc
        with self._lock:
            self._cache[spec.key] = result
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        if isinstance(result, GrammarError):
            raise GrammarError(str(result), result.param)
        return result

    def _build(self, spec: GrammarSpec, t0: float) -> CompiledGrammar:
        schema = spec.schema_obj()
        param = "response_format" if spec.kind == "json_object" else "response_format.json_schema.schema"
        if spec.kind == "json_object" or spec.strict:
            grammar, narrowed = self._strict(schema, param)
            return CompiledGrammar(spec, grammar, (time.perf_counter() - t0) * 1e3, narrowed=narrowed)
        grammar, relaxed, narrowed = best_effort(self, schema, param)
        return CompiledGrammar(spec, grammar, (time.perf_counter() - t0) * 1e3, relaxed, narrowed)

    def _strict(self, schema: object, param: str) -> tuple[str, tuple[str, ...]]:
        """The exact grammar (and what it narrows), or a GrammarError naming every unenforceable part."""
        problem = recursion_problem(schema)
        if problem is not None:
            raise GrammarError(problem, param)
        prepared = prepare(schema)
        if prepared.problems:
            raise GrammarError(unsupported_message(prepared.problems + prepared.unproven_one_of), param)
        try:
            grammar = self.grammar_for(prepared.schema, param)
        except GrammarError as exc:
            if prepared.unproven_one_of and "oneOf" in str(exc):
                raise GrammarError(unsupported_message(prepared.unproven_one_of), param) from None
            if REGEX_ERROR in str(exc):  # find every bad pattern (checked one by one only now: it costs)
                located = prepare(schema, pattern_error=self.pattern_error).problems
                raise GrammarError(unsupported_message(located), param) if located else exc from None
            raise
        self.check_runs(grammar, schema, param)
        return grammar, tuple(map(str, prepared.narrowed))

    def grammar_for(self, schema: object, param: str, warnings_ok: bool = False, **options: bool) -> str:
        """llguidance's grammar for an already prepared schema; GrammarError with its (short) reason.

        options: JSON compile options over JSON_OPTIONS (best effort: coerce_one_of, lenient), under
        which llguidance warns about what it relaxes: warnings_ok then accepts them."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                    defaults={**JSON_OPTIONS, **options})
        except ValueError as exc:
            raise GrammarError(f"invalid JSON schema: {short_error(str(exc))}", param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer, limits=parser_limits())
        if is_error or (messages and not warnings_ok):
            # Warnings name constraints llguidance would not enforce: refuse rather than fail open.
            detail = short_error("; ".join(m.strip() for m in messages), 240)
            raise GrammarError(f"the JSON schema cannot be enforced: {detail}", param)
        return grammar

    def check_runs(self, grammar: str, schema: object, param: str) -> None:
        """The dry runs: the grammar's first tokens, then each string constraint alone."""
        self._dry_run(grammar, param)
        self._check_strings(schema, param)

    def pattern_error(self, regex: str) -> str | None:
        """Why llguidance cannot use `regex` as a string pattern (None: it can). Cached."""
        with self._lock:
            if regex in self._patterns:
                return self._patterns[regex]
        try:
            self.grammar_for({"type": "string", "pattern": regex}, "")
            why = None
        except GrammarError as exc:
            why = short_error(str(exc).removeprefix("the JSON schema cannot be enforced: "), 120)
        with self._lock:
            self._patterns[regex] = why
            if len(self._patterns) > CACHE_SIZE * 16:
                self._patterns.pop(next(iter(self._patterns)))
        return why

    def _check_strings(self, schema: object, param: str) -> None:
        """Dry-run each string constraint alone (a regex is only lexed when generation reaches it).

        Passing constraints are cheap (~1 ms); the first failing one refuses the schema. Checks
        stop after STRING_CHECK_BUDGET_S, after which a limit is still reported mid-generation."""
        deadline = time.perf_counter() + STRING_CHECK_BUDGET_S
        for sub in string_constraints(schema):
            if time.perf_counter() > deadline:
                log.warning("string constraint checks stopped after %.1f s", STRING_CHECK_BUDGET_S)
                return
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(sub), defaults=JSON_OPTIONS)
            except ValueError:
                continue
            if llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer, limits=parser_limits()):
                continue  # not valid alone (the whole schema was): nothing to learn
            self._dry_run(grammar, param)

    def _dry_run(self, grammar: str, param: str) -> None:
        """Run the grammar as the engine would: first mask, DRY_RUN_TOKENS tokens, each next mask.

        Raises GrammarError when the matcher errs (a limit hit) or nothing but EOS is allowed before
        the document is complete. Deterministic, so its result is cached with the grammar."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=parser_limits())
        eos = [t for t in self.tokenizer.eos_tokens if t < self.vocab_size]
        for step in range(DRY_RUN_TOKENS + 1):
            mask = matcher.compute_bitmask() if not matcher.is_error() else b""
            if matcher.is_error():
                raise GrammarError(_limit_message(matcher.stop_reason(), matcher.get_error()), param)
            allowed = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")[: self.vocab_size]
            allowed[eos] = 0
            ids = np.flatnonzero(allowed)
            if not len(ids):
                if step == 0 or not matcher.is_accepting():
                    where = "start" if step == 0 else "continue"
                    raise GrammarError(f"the JSON schema has no valid instance (no token can {where} the "
                                       "document); check for contradictory constraints or an empty enum", param)
                return
            if step < DRY_RUN_TOKENS:
                matcher.consume_token(int(ids[0]))

    def new_matcher(self, grammar: CompiledGrammar) -> LLGuidanceMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar.grammar, log_level=1, limits=parser_limits())
        if matcher.is_error():
            raise GrammarError(f"grammar failed to start: {short_error(matcher.get_error())}")
        return LLGuidanceMatcher(matcher)

    def fill_masks(self, matchers: Sequence[LLGuidanceMatcher], out: np.ndarray) -> None:
        assert out.dtype == np.int32 and out.flags["C_CONTIGUOUS"] and out.shape == (len(matchers), self.mask_words)
        fill_next_token_bitmask_par(self.executor, [(m.inner, i) for i, m in enumerate(matchers)], out)
