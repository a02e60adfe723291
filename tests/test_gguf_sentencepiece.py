"""SentencePiece GGUF vocabularies (`tokenizer.ggml.model` "llama"): a tiny SentencePiece model is
trained in the session with the real `sentencepiece` package, written into a GGUF the way llama.cpp's
`_set_vocab_sentencepiece` does (pieces, scores, token types incl. <0xNN> byte tokens), and the
tokenizer rebuilt from the metadata must encode exactly as sentencepiece does (BPE models, with and
without the dummy prefix Gemma turns off), decode back, give each token's raw bytes, and let the
grammar engine constrain output. Unigram models follow llama.cpp's own merge algorithm instead
(what llama.cpp runs for every "llama" vocabulary), checked against a transcription of it."""

from __future__ import annotations

import heapq
import random

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
import sentencepiece as spm
from mlx_lm.utils import load as mlx_lm_load

from mlx_loom.models import gguf_arch
from mlx_loom.models.loader import load_model
from mlx_loom.models.layout import UnsupportedModelError
from mlx_loom.models.tokenizer import IncrementalDetokenizer, TextTokenizer
from mlx_loom.schemas.grammar import GrammarSpec
from mlx_loom.schemas.llguidance_backend import LLGuidanceBackend
from tiny_archs import make_tiny_arch_dir
from tiny_gguf import spm_vocab, write_gguf

VOCAB = 400  # 256 byte tokens + <unk> <s> </s> + ~140 learned pieces
_WORDS = ("the of and to in is that for it with as was on be by at this are from or have an they which one you "
          "were her all she there would their we him been has when who will more if out so said what up its about "
          "into than them can only other new some could time these two may then do first any my now such like our "
          "over man me even most made after also did many before must through back years where much your way well "
          "down should because each just those people how too little state good very make world").split()
TEXTS = [
    "Hello world",
    "the people of the world were there",
    " leading space",
    "   three leading spaces and  two  inside",
    "trailing space ",
    "tabs\tand\nnewlines\n\nhere\n",
    "digits 12345 and 3.14159, 2024!",
    "café naïve — ünïcödé",
    "中文测试，日本語のテキスト、한국어",
    "emoji 😀🎉👍🏽 and flags 🇫🇷",
    "symbols {\"json\": [1, 2]} <tag> ~`|",
    "<tool>call\n\nx<tool>  y   z",  # user-defined pieces in the gemma-like case
    "x",
    " ",
    "\n",
]


def _corpus(rng: random.Random) -> str:
    lines = []
    for i in range(2000):
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        if i % 7 == 0:
            line += f" {rng.randint(0, 99999)}."
        if i % 11 == 0:
            line = line.capitalize() + "!"
        if i % 13 == 0:
            line += " café naïve"
        lines.append(line)
    return "\n".join(lines)


def _train(tmp_path, kind: str, dummy_prefix: bool, user_defined: tuple[str, ...] = ()) -> spm.SentencePieceProcessor:
    """Settings of Llama 2's tokenizer.model (identity normalisation, spaces kept, digits split,
    byte fallback); Gemma's differs in add_dummy_prefix=False and user-defined pieces."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_corpus(random.Random(0)))
    prefix = tmp_path / f"{kind}{int(dummy_prefix)}"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type=kind, vocab_size=VOCAB, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=dummy_prefix, allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2,
        user_defined_symbols=list(user_defined))
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def _gguf_tokenizer(tmp_path, sp: spm.SentencePieceProcessor, add_space_prefix: bool | None,
                    user_defined: tuple[str, ...] = ()) -> TextTokenizer:
    """The vocabulary through a real GGUF file (metadata as mx.load returns it)."""
    source, _ = mlx_lm_load(str(make_tiny_arch_dir(tmp_path / "llama", "llama", overrides={"vocab_size": VOCAB})))
    vocab = spm_vocab(sp, VOCAB, add_space_prefix=add_space_prefix, user_defined=user_defined)
    path = write_gguf(source, "llama", tmp_path / "spm.gguf", spm=vocab)
    _, metadata = mx.load(str(path), return_metadata=True)
    return TextTokenizer.from_gguf_metadata(metadata)


# Gemma-like: user-defined pieces (typed USER_DEFINED, as the converter types tokenizer_config's
# non-special added tokens), matched where SentencePiece matches them. With a dummy prefix llama.cpp
# matches them in the raw text and prefixes the text after them again, unlike SentencePiece; that
# case is left out.
_USER_DEFINED = ("<tool>", "\n\n", "\u2581\u2581")
# (SentencePiece model type, add_dummy_prefix, what the GGUF says: None = no add_space_prefix key, user-defined)
BPE_CASES = [("bpe", True, None, ()), ("bpe", False, False, _USER_DEFINED)]


@pytest.fixture(scope="module", params=BPE_CASES, ids=["llama-like", "gemma-like"])
def bpe(request, tmp_path_factory):
    kind, dummy, key, user = request.param
    tmp = tmp_path_factory.mktemp(f"{kind}{int(dummy)}")
    sp = _train(tmp, kind, dummy, user)
    return sp, _gguf_tokenizer(tmp, sp, key, user), dummy


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_as_sentencepiece(bpe, text):
    sp, tok, _ = bpe
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)]  # add_bos_token, as the converter writes it


def test_byte_fallback_is_exercised(bpe):
    sp, tok, _ = bpe
    ids = tok.encode("中😀", add_special_tokens=False)
    assert all(sp.IsByte(i) for i in ids if tok.id_to_token(i) != "\u2581")
    assert [tok.id_to_token(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_and_token_bytes(bpe, text):
    sp, tok, dummy = bpe
    ids = tok.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text
    # raw bytes per token: "▁" is a space (the dummy prefix included), <0xNN> that byte
    assert b"".join(tok.token_bytes(i) for i in ids[1:]) == ((" " if dummy else "") + text).encode()
    streamed = IncrementalDetokenizer(tok)
    assert "".join(streamed.feed([i]) for i in ids) + streamed.flush() == text


def test_user_defined_pieces_stay_whole(bpe):
    """gemma-like: the user-defined pieces come out whole; llama-like has none, so the same text
    is split into learned pieces and bytes exactly as SentencePiece splits it."""
    sp, tok, dummy = bpe
    text = "a<tool>\n\nb  c"
    ids = tok.encode(text, add_special_tokens=False)
    if dummy:
        assert sp.PieceToId("<tool>") == sp.unk_id() and ids == sp.encode(text)
    else:
        assert {sp.PieceToId(p) for p in _USER_DEFINED} <= set(ids)


def test_control_tokens_are_special(bpe):
    sp, tok, dummy = bpe
    ids = tok.encode("</s>hi")
    assert ids[:2] == [sp.bos_id(), sp.eos_id()] and ids[2:] == sp.encode("hi")
    assert tok.decode(ids) == "hi"
    assert tok.eos_token_ids == {sp.eos_id()}


def test_json_schema_grammar_accepts_the_vocabulary(bpe):
    """llguidance reads the rebuilt tokenizer: a greedy walk over the allowed tokens spells a document."""
    _, tok, _ = bpe
    backend = LLGuidanceBackend(tok)
    # llguidance's bytes per token are ours ("▁" a space, <0xNN> one byte); it keeps 0xFF for itself
    seen = {i: backend.tokenizer.decode_bytes([i]) for i in range(VOCAB) if tok.id_to_token(i) != "<0xFF>"}
    assert seen == {i: tok.token_bytes(i) for i in seen}
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    matcher = backend.new_matcher(backend.compile(GrammarSpec.json_schema(schema, name="person")))
    target, done = '{"name": "Bob é 中", "age": 42}'.encode(), b""
    while done != target:
        out = np.zeros((1, backend.mask_words), dtype=np.int32)
        backend.fill_masks([matcher], out)
        allowed = np.unpackbits(out.view(np.uint8), axis=1, bitorder="little")[0, : backend.vocab_size]
        pieces = {int(i): tok.token_bytes(int(i)) for i in np.flatnonzero(allowed)}
        fits = [i for i, piece in pieces.items() if piece and target.startswith(done + piece)]
        assert fits, f"no allowed token continues {done!r}"
        best = max(fits, key=lambda i: len(pieces[i]))
        assert matcher.consume(best)
        done += tok.token_bytes(best)
    assert matcher.is_accepting()


def _llama_cpp_spm(text: str, vocab: dict[str, int], scores: dict[str, float], add_space_prefix: bool) -> list[int]:
    """A transcription of llama.cpp's llm_tokenizer_spm_session::tokenize: merge the adjacent pair
    whose concatenation is the best-scoring token (leftmost first) until none is left, then spell
    pieces that are not tokens as their bytes' <0xNN> tokens."""
    text = (" " + text if add_space_prefix and text else text).replace(" ", "\u2581")
    symbols = list(text)  # merged-away symbols become None
    nxt = list(range(1, len(symbols))) + [-1]
    prv = list(range(-1, len(symbols) - 1))
    queue: list = []

    def push(left: int, right: int) -> None:
        if left >= 0 and right >= 0 and (merged := symbols[left] + symbols[right]) in vocab:
            heapq.heappush(queue, (-scores[merged], left, right, merged))

    for i in range(1, len(symbols)):
        push(i - 1, i)
    while queue:
        _, left, right, merged = heapq.heappop(queue)
        if symbols[left] is None or symbols[right] is None or symbols[left] + symbols[right] != merged:
            continue  # stale: one side merged since
        symbols[left], symbols[right] = merged, None
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    out = []
    for piece in (s for s in symbols if s is not None):
        out += [vocab[piece]] if piece in vocab else [vocab[f"<0x{b:02X}>"] for b in piece.encode()]
    return out


def test_unigram_vocabularies_follow_llama_cpps_algorithm(tmp_path):
    """llama.cpp runs every "llama" vocabulary through its SPM merges (not sentencepiece's unigram
    Viterbi), so a unigram model's GGUF tokenizes as llama.cpp does, not as sentencepiece would."""
    sp = _train(tmp_path, "unigram", True)
    tok = _gguf_tokenizer(tmp_path, sp, None)
    vocab = {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
    scores = {sp.IdToPiece(i): sp.GetScore(i) for i in range(sp.vocab_size())}
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == _llama_cpp_spm(text, vocab, scores, True), text
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("case, arch, dummy", [("llama", "llama", True), ("gemma3_text", "gemma3", False)])
def test_spm_gguf_loads_end_to_end(case, arch, dummy, tmp_path):
    """load_model on a GGUF with a SentencePiece vocabulary (Gemma's without the space prefix): its
    tokenizer and the model's logits."""
    sp = _train(tmp_path, "bpe", dummy)
    source, _ = mlx_lm_load(str(make_tiny_arch_dir(tmp_path / case, case, overrides={"vocab_size": VOCAB})))
    vocab = spm_vocab(sp, VOCAB, add_space_prefix=None if dummy else False)
    loaded = load_model(str(write_gguf(source, arch, tmp_path / "m.gguf", spm=vocab)))
    assert loaded.tokenizer.sentencepiece and loaded.vocab_size == VOCAB
    prompt = loaded.tokenizer.encode("the world was there 42")
    assert prompt == [sp.bos_id(), *sp.encode("the world was there 42")]
    logits = loaded.model(mx.array([prompt]))
    ref = source(mx.array([prompt]))
    assert (mx.abs(logits - ref).max() / mx.abs(ref).max()).item() < 1e-5


def test_other_tokenizer_models_are_refused_by_name():
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(UnsupportedModelError, match="'t5'.*'gpt2'.*'llama'"):
        gguf_arch.gguf_arch(meta)
    with pytest.raises(ValueError, match="'t5'"):
        TextTokenizer.from_gguf_metadata(meta)
