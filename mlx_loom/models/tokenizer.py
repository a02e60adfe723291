"""Text <-> token ids, chat templates and streaming detokenization, without mlx.

A GGUF file carries its whole tokenizer in metadata (vocab, merges or scores, token types, chat
template); `TextTokenizer.from_gguf_metadata` rebuilds it as a `tokenizers.Tokenizer` so the server
needs no Hugging Face download: a byte-level BPE (`tokenizer.ggml.model` "gpt2") or llama.cpp's
SentencePiece tokenizer ("llama": Llama 1/2, Mistral v0.1, Gemma, Phi-3 vocabularies). mlx-lm model
directories come with a transformers tokenizer instead; `TextTokenizer.from_hf` wraps it behind the
same interface.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from typing import Any, Iterable, Sequence

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
)

# GGUF token types (llama.cpp `llama_token_type`).
_NORMAL = 1
_CONTROL = 3
_USER_DEFINED = 4
_BYTE = 6

GGUF_TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE, SentencePiece (llama.cpp's SPM)
_SPACE = "\u2581"  # SentencePiece's "▁": a space inside a piece

# Control tokens that end a turn or a document; used to find the template's stop tokens.
_END_MARKERS = ("end", "eot", "eos", "</s>")


def _py(value: Any) -> Any:
    """GGUF metadata may hold mx.array scalars/vectors; duck-type them into python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _opt_int(value: Any) -> int | None:
    value = _py(value)
    return None if value is None else int(value)


class TextTokenizer:
    """A `tokenizers` tokenizer (byte-level BPE or SentencePiece, from GGUF metadata) plus its chat template."""

    def __init__(self, backend: Tokenizer, *, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool, chat_template: str | None, control_ids: Iterable[int] = (),
                 sentencepiece: bool = False, byte_ids: Iterable[int] = ()) -> None:
        self.backend = backend  # public: e.g. for grammar engines that need the raw tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.control_ids = frozenset(control_ids)
        self.sentencepiece = sentencepiece  # pieces spell spaces "▁" and bytes "<0xNN>", not GPT-2's byte chars
        self.byte_ids = frozenset(byte_ids)  # SentencePiece byte-fallback tokens

    # -- construction --
    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> TextTokenizer:
        kind = _py(metadata.get("tokenizer.ggml.model", "gpt2"))
        if kind not in GGUF_TOKENIZER_MODELS:
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2' "
                             "and SentencePiece 'llama')")
        tokens: list[str] = list(_py(metadata["tokenizer.ggml.tokens"]))
        types = _py(metadata.get("tokenizer.ggml.token_type")) or [_NORMAL] * len(tokens)
        spm = kind == "llama"
        add_prefix = spm and bool(_py(metadata.get("tokenizer.ggml.add_space_prefix", True)))
        backend = _sentencepiece(tokens, types, metadata, add_prefix) if spm else _byte_level_bpe(tokens, metadata)
        control = [i for i, t in enumerate(types) if t == _CONTROL]
        # Special tokens are matched whole in any text and dropped by decode(skip_special_tokens=True).
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
        user = [i for i, t in enumerate(types) if t == _USER_DEFINED]
        if user:
            # SentencePiece matches its user-defined pieces in the text with spaces as "▁" (normalized);
            # not where a prefix is prepended, as the normaliser would prepend it to the pieces too:
            # there they are matched in the raw text, as llama.cpp does.
            backend.add_tokens([AddedToken(tokens[i], special=False, normalized=spm and not add_prefix)
                                for i in user])
        # llama.cpp's defaults when the keys are absent: SPM vocabularies start with <s> (1) ... </s> (2).
        bos = metadata.get("tokenizer.ggml.bos_token_id", 1 if spm else None)
        eos = metadata.get("tokenizer.ggml.eos_token_id", 2 if spm else None)
        return cls(
            backend,
            bos_token_id=_opt_int(bos),
            eos_token_id=_opt_int(eos),
            add_bos=bool(_py(metadata.get("tokenizer.ggml.add_bos_token", spm))),
            chat_template=_py(metadata.get("tokenizer.chat_template")),
            control_ids=control,
            sentencepiece=spm,
            byte_ids=[i for i, t in enumerate(types) if t == _BYTE] if spm else (),
        )

    @classmethod
    def from_hf(cls, hf_tokenizer: Any) -> TextTokenizer:
        """Wrap a transformers tokenizer or mlx-lm TokenizerWrapper (for mlx-lm model dirs)."""
        return HFTextTokenizer(hf_tokenizer)

    # -- encode / decode --
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            return [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (what it adds to the text, before decode strips a SentencePiece
        dummy-prefix space); special tokens as their UTF-8 text."""
        tok = self.id_to_token(token_id) or ""
        if token_id in self.control_ids:
            return tok.encode()
        if self.sentencepiece:
            return bytes([int(tok[3:-1], 16)]) if token_id in self.byte_ids else tok.replace(_SPACE, " ").encode()
        table = _byte_decoder()
        return bytes(table[c] for c in tok) if all(c in table for c in tok) else tok.encode()

    # -- stop tokens --
    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """eos plus control tokens that end a turn in the template (e.g. <|im_end|>) or a text."""
        ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        template = self.chat_template or ""
        for i in self.control_ids:
            name = (self.id_to_token(i) or "").lower()
            if "endoftext" in name or (name in template.lower() and _ends_something(name)):
                ids.add(i)
        return frozenset(ids)

    # -- chat --
    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.id_to_token(token_id) or ""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; use the completions endpoint")
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._special_text(self.bos_token_id), eos_token=self._special_text(self.eos_token_id),
            **kwargs)


class HFTextTokenizer(TextTokenizer):
    """TextTokenizer interface over a transformers tokenizer / mlx-lm TokenizerWrapper."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        # mlx-lm's wrapper forwards attributes but not dunders like __len__: keep the inner one too.
        self.inner = getattr(hf, "_tokenizer", hf)
        # add_bos=False: hf.encode applies the model's own BOS rule.
        super().__init__(getattr(self.inner, "backend_tokenizer", None), bos_token_id=hf.bos_token_id,
                         eos_token_id=hf.eos_token_id, add_bos=False,
                         chat_template=getattr(hf, "chat_template", None),
                         control_ids=getattr(hf, "all_special_ids", ()))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.inner)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.convert_ids_to_tokens(token_id)

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        ids = set(getattr(self.hf, "eos_token_ids", None) or ())  # mlx-lm wrapper: generation_config eos
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return frozenset(ids) | super().eos_token_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=False, **kwargs)


def _byte_level_bpe(tokens: list[str], metadata: dict) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in _py(metadata.get("tokenizer.ggml.merges", []))]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = _pre_tokenizer(_py(metadata.get("tokenizer.ggml.pre", "default")))
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(tokens: list[str], types: list[int], metadata: dict, add_prefix: bool) -> Tokenizer:
    """llama.cpp's SPM tokenizer (llm_tokenizer_spm) as a `tokenizers` BPE, as transformers' GGUF
    and slow-to-fast Llama converters build it.

    llama.cpp escapes spaces as "▁" (after prepending one to each text run when
    `tokenizer.ggml.add_space_prefix`, default true; Gemma writes false), starts from single
    characters, repeatedly merges the adjacent pair whose concatenation is the highest-scoring
    token (leftmost first), and spells a character outside the vocabulary as its UTF-8 byte
    tokens <0xNN>. A BPE whose merges are ranked by the merged token's score, with byte fallback,
    does the same; there is no pre-tokenizer, since llama.cpp never splits the text.
    """
    scores = list(_py(metadata.get("tokenizer.ggml.scores")) or [0.0] * len(tokens))
    unk = _opt_int(metadata.get("tokenizer.ggml.unknown_token_id", 0))
    vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=_spm_merges(tokens, types, scores, vocab),
                       unk_token=tokens[unk] if unk is not None and unk < len(tokens) else None,
                       fuse_unk=True, byte_fallback=True)
    backend = Tokenizer(model)
    steps = [normalizers.Prepend(_SPACE)] if add_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPACE)])
    decode = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:  # the prepended space is not part of the text (llama.cpp drops it too)
        decode.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode)
    return backend


def _spm_merges(tokens: list[str], types: list[int], scores: list[float],
                vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of each normal or user-defined token into two such tokens, best-scoring
    result first (llama.cpp merges into any token of the text; control, byte and unused tokens never
    arise from text in SentencePiece, so they are left out)."""
    normal = {t for t, kind in zip(tokens, types) if kind in (_NORMAL, _USER_DEFINED)}
    found = []
    for token in normal:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                found.append((-scores[vocab[token]], vocab[token], vocab[left], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _ends_something(name: str) -> bool:
    return any(m in name for m in _END_MARKERS) and "start" not in name


# llama.cpp's pre-tokenizer names -> the split regex of that family's Hugging Face tokenizer.json.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_REGEX = {
    "qwen2": _WORDS + r"\p{N}" + _REST,
    "llama-bpe": _WORDS + r"\p{N}{1,3}" + _REST,
}


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's `tokenizer.ggml.pre` names the pre-tokenizer regex family."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM/StarCoder: every digit its own pre-token
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_REGEX:  # the families' own regex, then bytes (as their tokenizer.json does)
        split = pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # GPT-2 regex: exact for "gpt-2"/"default"; an approximation for other families.
    return byte_level


_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable char standing for each byte."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        chars, extra = {}, 0
        for b in range(256):
            if b in keep:
                chars[chr(b)] = b
            else:
                chars[chr(256 + extra)] = b
                extra += 1
        _BYTE_DECODER = chars
    return _BYTE_DECODER


def _raise_exception(message: str) -> None:
    raise ValueError(message)  # templates call raise_exception() on invalid conversations


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


_ENV: ImmutableSandboxedEnvironment | None = None


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (sandboxed, HF whitespace rules)."""
    global _ENV
    if _ENV is None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        _ENV = env
    return _ENV


def render_chat_template(template: str, messages: list[dict], **context: Any) -> str:
    return _jinja_env().from_string(template).render(messages=messages, **context)


class IncrementalDetokenizer:
    """Streams text for a growing list of token ids, never splitting a UTF-8 character.

    Like vLLM / HF TextStreamer: decode only a window ids[prefix:] and emit what it adds over
    ids[prefix:read]; the window restarts at each emitted chunk, so each step costs O(chunk),
    not O(all tokens). Decoding with the previous chunk as left context keeps tokenizers that
    strip a leading space from the first token (SentencePiece) from changing already-sent text.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens before this are already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, force: bool) -> str:
        sent = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        # A trailing U+FFFD means the last token ends inside a multi-byte char: wait for the rest.
        if len(text) <= len(sent) or (text.endswith("\ufffd") and not force):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(sent) :]

    def feed(self, token_ids: Sequence[int]) -> str:
        """Text completed by these new tokens (may be empty)."""
        self.ids.extend(token_ids)
        return self._advance(force=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete char decodes as U+FFFD)."""
        return self._advance(force=True)
