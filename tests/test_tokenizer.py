"""TextTokenizer from the embedded SmolLM2 GGUF metadata, chat template, streaming detokenizer."""

import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
from mlx_loom.models.tokenizer import IncrementalDetokenizer, render_chat_template

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days.",
    "  leading spaces\tand\ttabs\n\nnewlines  ",
    "emoji 😀🎉👍🏽 and flags 🇫🇷",
    "中文测试，日本語のテキスト、한국어",
    "mixed: naïve café — 3.14159 ≈ π",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()


def test_known_encodings(tok):
    assert [tok.id_to_token(i) for i in tok.encode("Hello world")] == ["Hello", "Ġworld"]
    assert tok.encode("Hello world") == [19556, 905]
    # SmolLM's pre-tokenizer splits every digit.
    assert [tok.id_to_token(i) for i in tok.encode("12345")] == list("12345")


def test_no_bos_and_vocab(tok):
    assert tok.add_bos is False and tok.bos_token_id == 1
    assert tok.encode("Hi")[0] != 1
    assert tok.vocab_size == 49152


def test_control_tokens_are_whole_and_skipped(tok):
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nHi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


def test_eos_ids(tok):
    assert 2 in tok.eos_token_ids  # <|im_end|>
    assert 0 in tok.eos_token_ids  # <|endoftext|>
    assert 1 not in tok.eos_token_ids  # <|im_start|>


def test_chat_template_default_system(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_explicit_system_no_generation_prompt(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_raise_exception_in_template():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    assert render_chat_template(template, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ValueError, match="user first"):
        render_chat_template(template, [{"role": "assistant", "content": "x"}])


def _stream(tok, ids, step=1):
    detok = IncrementalDetokenizer(tok)
    chunks = [detok.feed(ids[i : i + step]) for i in range(0, len(ids), step)]
    return chunks + [detok.flush()]


@pytest.mark.parametrize("step", [1, 2, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_matches_decode(tok, text, step):
    ids = tok.encode(text)
    chunks = _stream(tok, ids, step)
    assert "".join(chunks) == tok.decode(ids)
    assert not any("\ufffd" in c for c in chunks)


def test_incremental_holds_back_partial_char(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji spans tokens, so the first one ends mid-character
    detok = IncrementalDetokenizer(tok)
    assert detok.feed(ids[:1]) == ""
    assert detok.feed(ids[1:]) == "😀"
    assert detok.flush() == ""


def test_incremental_skips_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nParis 🗼<|im_end|>")
    assert "".join(_stream(tok, ids)) == "assistant\nParis 🗼"


def test_flush_returns_incomplete_tail(tok):
    ids = tok.encode("ok 😀")
    detok = IncrementalDetokenizer(tok)
    assert detok.feed(ids[:1]) == "ok"
    assert detok.feed(ids[1:-1]) == ""  # " " + the emoji's first bytes: held back
    tail = detok.flush()
    assert tail.startswith(" ") and tail.endswith("\ufffd")
    assert detok.flush() == ""
