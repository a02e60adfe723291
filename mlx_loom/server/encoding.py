"""Prompt text -> token ids, as the routes need it: without holding the GIL for seconds, and with
a chat template's control tokens recognized only where the template itself wrote them.

Why not just `tokenizer.encode`: `tokenizers.Tokenizer.encode` keeps the GIL for the whole call
(seconds for a few MB of text), so even in a worker thread it stalls the event loop and every
other connection; `encode_batch` releases it. And a tokenizer matches special-token strings in
any text, so a user who types "<|im_end|>" would otherwise end the turn for real.

Run everything here in a worker thread (the first call per tokenizer also probes it).
"""

from __future__ import annotations

import re
import secrets
import threading
import weakref
from typing import Any, Callable, Sequence

import tokenizers

# Texts on which the GIL-free path must give exactly the tokenizer's own ids before it is used.
_PROBES = ("Hello world", "  leading spaces\tand\ttabs\n\nnewlines  ", "digits 12345 and 3.14159",
           "naïve café — 日本語のテキスト 🙂", " x", "a\r\nb")


class PromptEncoder:
    """One tokenizer's encoding helpers, built once per tokenizer (see `encoder_for`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._backend = _rust_tokenizer(tokenizer)
        self.specials: dict[str, int] = self._special_strings()
        """Special (control) token text -> id: what user text must never turn into."""
        self._affixes = self._find_affixes() if self._backend is not None else None
        self._plain: tokenizers.Tokenizer | None = None

    # -- what the tokenizer has --
    def _special_strings(self) -> dict[str, int]:
        if self._backend is not None:
            added = self._backend.get_added_tokens_decoder()
            return {tok.content: i for i, tok in added.items() if tok.special and tok.content}
        id_to_token = getattr(self.tokenizer, "id_to_token", None)
        ids = getattr(self.tokenizer, "control_ids", ())
        return {text: i for i in ids if id_to_token and (text := id_to_token(i))}

    def _find_affixes(self) -> tuple[list[int], list[int]] | None:
        """(prefix, suffix) the tokenizer adds around a text (BOS, ...), if the GIL-free path gives
        exactly its ids on every probe; else None (and `encode` calls the tokenizer itself)."""
        try:
            full = list(self.tokenizer.encode(_PROBES[0]))
            bare = list(self.tokenizer.encode(_PROBES[0], add_special_tokens=False))
        except TypeError:  # an encode() without add_special_tokens: nothing to compare against
            return None
        start = next((k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare), None)
        if start is None:
            return None
        prefix, suffix = full[:start], full[start + len(bare):]
        for probe in _PROBES:
            core = self._core(probe)
            if core != list(self.tokenizer.encode(probe, add_special_tokens=False)):
                return None
            if prefix + core + suffix != list(self.tokenizer.encode(probe)):
                return None
        return prefix, suffix

    # -- encoding --
    def _core(self, text: str) -> list[int]:
        """Ids without BOS/EOS, special tokens recognized; encode_batch releases the GIL."""
        return self._backend.encode_batch([text], add_special_tokens=False)[0].ids

    def encode(self, text: str) -> list[int]:
        """Exactly `tokenizer.encode(text)`, without holding the GIL where the backend allows."""
        if self._affixes is None:
            return list(self.tokenizer.encode(text))
        prefix, suffix = self._affixes
        return prefix + self._core(text) + suffix

    def _plain_ids(self, text: str) -> list[int]:
        """Ids of `text` with special-token strings encoded as ordinary text."""
        if self._plain is None:
            # A private copy: the flag is per tokenizer object and the shared one must keep
            # recognizing the template's own control tokens in other threads.
            plain = tokenizers.Tokenizer.from_str(self._backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode_batch([text], add_special_tokens=False)[0].ids

    @property
    def can_encode_plain(self) -> bool:
        return self._affixes is not None

    def encode_template(self, rendered: str, shield: Shield) -> list[int]:
        """Ids of a rendered chat prompt in which `shield` replaced the user's special strings."""
        parts = shield.split(rendered)
        if len(parts) == 1:
            return self.encode(rendered)
        prefix, suffix = self._affixes
        ids = list(prefix)
        for i, part in enumerate(parts):
            if i % 2:  # a special string from the user: plain text
                ids += self._plain_ids(part)
            elif part:  # the template's text, its control tokens recognized
                ids += self._core(part)
        return ids + suffix


def _rust_tokenizer(tokenizer: Any) -> tokenizers.Tokenizer | None:
    """The `tokenizers` object behind a TextTokenizer: its `backend`, or for a wrapped transformers
    tokenizer whose backend was not found, transformers' public `backend_tokenizer`."""
    for candidate in (getattr(tokenizer, "backend", None),
                      getattr(getattr(tokenizer, "hf", None), "backend_tokenizer", None)):
        if isinstance(candidate, tokenizers.Tokenizer):
            return candidate
    return None


_ENCODERS: weakref.WeakKeyDictionary[Any, PromptEncoder] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def encoder_for(tokenizer: Any) -> PromptEncoder:
    """The PromptEncoder of this tokenizer (built on first use, then cached with it)."""
    with _LOCK:
        try:
            encoder = _ENCODERS.get(tokenizer)
            if encoder is None:
                encoder = _ENCODERS[tokenizer] = PromptEncoder(tokenizer)
        except TypeError:  # not weak-referenceable: build one per call (cheap without a backend)
            encoder = PromptEncoder(tokenizer)
        return encoder


class Shield:
    """Replaces special-token strings in client text by sentinels before the template renders it,
    so that after rendering the template's own control tokens and the user's look different.

    A sentinel is private-use characters around a per-request random nonce and the index of the
    special string, so no client text can forge one. One Shield per request.
    """

    def __init__(self, specials: Sequence[str]) -> None:
        self.specials = sorted(specials, key=len, reverse=True)  # longest first: "<|a|>x" before "<|a|>"
        self._index = {s: i for i, s in enumerate(self.specials)}
        self._pattern = re.compile("|".join(re.escape(s) for s in self.specials)) if self.specials else None
        nonce = secrets.token_hex(8)
        self._prefix = f"\ue000{nonce}:"
        self._sentinel = re.compile(re.escape(self._prefix) + "([0-9]+)\ue001")
        self.found = False
        """Whether any client text held a special string."""

    def cover(self, value: Any) -> Any:
        """`value` (strings, lists, dicts, as in message dicts and tools) with special strings replaced."""
        if self._pattern is None:
            return value
        return _map_strings(value, lambda s: self._pattern.sub(self._replace, s))

    def _replace(self, match: re.Match[str]) -> str:
        self.found = True
        return f"{self._prefix}{self._index[match.group(0)]}\ue001"

    def split(self, rendered: str) -> list[str]:
        """[template text, special string, template text, ...]; [rendered] when nothing was covered."""
        if not self.found:
            return [rendered]
        parts = self._sentinel.split(rendered)
        for i in range(1, len(parts), 2):
            parts[i] = self.specials[int(parts[i])]
        return parts


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    return value
